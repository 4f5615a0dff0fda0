"""The ``python -m mamba_train.export`` / ``mamba-train-export`` command. The formats it writes
live in ``mamba_train.formats``; loading any of them is ``mamba_train.load_model``."""
