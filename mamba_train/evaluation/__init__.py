"""Evaluation: the lm-eval adapter (``--model mamba_train``), offline task files (``tasks/``),
the ``python -m mamba_train.eval`` runner and the eval-after-training callback.

Kept free of imports at package level: ``lm_eval`` is an optional dependency (``pip install
"mamba_train[eval]"``) and slow to import.
"""
