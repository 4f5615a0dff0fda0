"""Hydra configs (a package so `initialize_config_module("mamba_train.conf")` finds them)."""
