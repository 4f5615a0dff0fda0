"""Export to other formats: Hugging Face transformers (``hf.py``) and the ``python -m
mamba_train.export`` entry. Loading any format is ``mamba_train.checkpoint.load_model``."""
