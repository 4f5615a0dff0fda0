"""Activation checkpointing of the backbone's blocks (``module.activation_checkpointing``).

A checkpointed block keeps only its two inputs (hidden states and residual stream) for the
backward and runs its forward a second time there, so the activations stored for a step shrink
from every block's internals to two ``tokens x d_model`` tensors per block. The price is one
more forward of those blocks: ~1/3 more block compute with every block checkpointed (the fused
Mamba kernels already recompute part of their own forward inside the backward, so the measured
cost is lower; ``benchmarks/long_context.py``).

Policies:

* ``off`` -- nothing is recomputed (the default);
* ``all`` -- every block;
* ``every_k`` -- blocks ``0, k, 2k, ...`` (``module.activation_checkpointing_k``): a dial between
  the two, about ``1/k`` of the activation memory saved for ``1/k`` of the recompute.

How: :func:`apply_activation_checkpointing` marks the chosen :class:`~mamba_train.models.lm.Block`
modules; a marked block wraps its own forward in ``torch.utils.checkpoint`` (non-reentrant).
Marking rather than wrapping the modules keeps the module tree, parameter names and
``state_dict`` keys unchanged, so optimizer groups by name, checkpoints, export and the init
guard see the same model with or without it. Because the recompute sits *inside* the block, it
works the same on one device, under DDP, inside each FSDP unit (the unit gathers its parameters
before the block runs, in the forward and in the backward) and under DeepSpeed ZeRO (whose
module hooks re-gather for the recompute). It is applied once, in
``MambaLMModule.configure_model``, whatever the strategy.

The model has no stochastic layers (no dropout, as in the papers), so the recompute needs no
saved RNG state (``preserve_rng_state=False``): this saves the per-block RNG snapshot and keeps
the step capturable as a CUDA graph. A block holding an active dropout is refused.
"""

from __future__ import annotations

from torch import nn

from mamba_train.models.config import ConfigError

POLICIES = ("off", "all", "every_k")
_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
_ALIASES = {False: "off", None: "off", "none": "off", "false": "off", True: "all", "true": "all",
            "every_block": "all"}


class ActivationCheckpointingError(ConfigError):
    """An unknown ``module.activation_checkpointing`` policy or a bad ``k``."""


def normalize_policy(policy: str | bool | None) -> str:
    """``off`` / ``all`` / ``every_k`` (YAML reads a bare ``off`` as ``False``: accepted)."""
    key = policy.lower() if isinstance(policy, str) else policy
    key = _ALIASES.get(key, key)
    if key not in POLICIES:
        raise ActivationCheckpointingError(
            f"module.activation_checkpointing={policy!r}: expected one of {POLICIES} "
            "(every_k checkpoints blocks 0, k, 2k, ... with k = module.activation_checkpointing_k)")
    return key


def checkpointed_block_indices(n_layer: int, policy: str | bool | None, k: int = 2) -> list[int]:
    """Indices of the blocks that ``policy`` recomputes in the backward."""
    policy = normalize_policy(policy)
    if policy == "off":
        return []
    if policy == "all":
        return list(range(n_layer))
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ActivationCheckpointingError(
            f"module.activation_checkpointing_k={k!r}: must be a positive integer (1 = every block)")
    return list(range(0, n_layer, k))


def _blocks(model: nn.Module) -> nn.ModuleList:
    inner = getattr(model, "model", model)  # a LightningModule holding the MambaLM, or the MambaLM
    try:
        return inner.backbone.layers
    except AttributeError:
        raise TypeError(f"{type(model).__name__} has no backbone.layers: not a MambaLM") from None


def apply_activation_checkpointing(model: nn.Module, policy: str | bool | None = "off",
                                   k: int = 2) -> list[int]:
    """Mark the backbone blocks of ``model`` (a ``MambaLM``) that recompute their forward in
    the backward; the others are unmarked. Returns the marked indices.

    Idempotent: applying ``off`` undoes an earlier call. Call it before a sharding wrapper
    (FSDP, DeepSpeed) takes the model, or after: the mark is a plain attribute of each block.
    """
    blocks = _blocks(model)
    chosen = set(checkpointed_block_indices(len(blocks), policy, k))
    for i, block in enumerate(blocks):
        if i in chosen:
            for m in block.modules():
                if isinstance(m, _DROPOUTS) and m.p > 0:
                    raise ActivationCheckpointingError(
                        f"block {i} has dropout (p={m.p}): the recompute would draw another mask. "
                        "Activation checkpointing here assumes a deterministic forward.")
        block.checkpoint_activations = i in chosen
    return sorted(chosen)


def describe(model: nn.Module) -> str:
    """``"activation checkpointing: 24 of 48 blocks"`` (or ``off``), for logs."""
    blocks = _blocks(model)
    n = sum(bool(getattr(b, "checkpoint_activations", False)) for b in blocks)
    return f"activation checkpointing: {n} of {len(blocks)} blocks" if n else "activation checkpointing: off"
