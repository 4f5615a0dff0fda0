"""Arm (a) of ``train_throughput.py`` for recipes with a layer pattern (``hybrid-370m``):
mamba_ssm's ``MambaLMHeadModel`` cannot build them, transformers' hybrid families can.

``hf_model`` builds the model as the transformers family our export maps it to
(``mamba_train.formats.hf.to_hf_config``: ``NemotronHForCausalLM`` for ``hybrid-370m``,
``BambaForCausalLM`` / ``FalconH1ForCausalLM`` for those recipes), with transformers' own random
init; ``train_throughput.plain_loop`` trains it like every arm (a): bf16 autocast over fp32
parameters, fused AdamW over the same decay groups, clip 1.0, loss on an fp32 copy of the
logits. transformers' Mamba-2 layers call mamba_ssm's fused ``mamba_split_conv1d_scan_combined``
and causal_conv1d where both are installed (its PyTorch scan otherwise: ``describe`` says which);
attention runs through ``sdpa``.

transformers' ``NemotronHForCausalLM`` never ties its head to the embedding (``tie_word_embeddings``
has no effect there); a recipe with tied embeddings gets them tied here by hand, so both arms
train the same parameters.
"""

from __future__ import annotations

import importlib.util


def hf_model(cfg, attn_implementation: str = "sdpa"):
    """The transformers ``*ForCausalLM`` with ``cfg``'s shapes, on the current default device."""
    import transformers

    from mamba_train.formats.hf import to_hf_config

    model = transformers.AutoModelForCausalLM.from_config(
        to_hf_config(cfg), attn_implementation=attn_implementation)
    emb = model.get_input_embeddings()
    if cfg.tie_embeddings and model.lm_head.weight is not emb.weight:
        model.lm_head.weight = emb.weight
    # training mode without an inference cache: the Mamba-2 mixers take their fused training
    # kernel only then (``self.training and cache is None`` in transformers' mixer)
    model.config.use_cache = False
    return model.train()


def describe(model) -> str:
    kernels = all(importlib.util.find_spec(m) is not None for m in ("mamba_ssm", "causal_conv1d"))
    n = sum(p.numel() for p in model.parameters())
    return (f"arm (a) is transformers {type(model).__name__} ({n / 1e6:.1f} M parameters, "
            f"{'mamba_ssm kernels' if kernels else 'PyTorch scan: no mamba_ssm/causal_conv1d'}, "
            f"attention {model.config._attn_implementation})")
