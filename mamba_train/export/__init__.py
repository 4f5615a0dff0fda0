"""Interchange: the mamba_ssm directory format, Hugging Face transformers, and load_model."""
