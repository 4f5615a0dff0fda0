"""Weight and checkpoint formats, each in one module:

* ``checkpoint`` -- our training checkpoint (``.ckpt``): every key mamba_train writes into it,
  and the only way it is opened (never unpickling code).
* ``hf`` -- Hugging Face ``transformers`` directories: a registry of model families
  (``hf_family``; Mamba/Mamba-2 in ``hf_mamba``) and ``read_hf``; ``hf_export`` writes one.
* ``load`` -- ``read_weights`` / ``load_model`` over every source, and the tokenizer a source
  was trained with.

The ``mamba_ssm`` directory format stays with the model it serialises
(``models/mamba_ssm_format.py``: ``MambaLM.save_pretrained`` writes it, and ``models/`` imports
nothing above it). Submodules are imported on use: reading a ``.ckpt`` needs no transformers.
"""
