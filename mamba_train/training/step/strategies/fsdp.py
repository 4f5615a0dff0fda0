"""FSDP for a ``MambaLM``: one FSDP unit per ``Block``, fp32 parameters and gradient reduction
(bf16 compute from autocast); see ``strategies/__init__.py`` for the precision policy."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch.distributed.fsdp import MixedPrecision

from mamba_train.dtypes import parse_dtype
from mamba_train.training.step.strategies.cpu_shims import FSDPOnCPU
from mamba_train.training.step.strategies.policy import ParallelConfigError, refuse_low_precision


class MambaFSDPStrategy(FSDPOnCPU, FSDPStrategy):
    """Lightning's FSDPStrategy, also on CPU processes over gloo (the CPU tests:
    ``cpu_shims.FSDPOnCPU``). Gradients are clipped by global norm in the training step
    (``training/step/train_step.py``: FSDP's own ``clip_grad_norm_`` on the root module)."""


def fsdp_strategy(state_dict_type: str = "full",
                  sharding_strategy: str = "FULL_SHARD", param_dtype: str = "float32",
                  reduce_dtype: str = "float32", cpu_offload: bool = False,
                  sync_module_states: bool = True, allow_low_precision_params: bool = False,
                  **kwargs: Any):
    """Lightning ``FSDPStrategy`` for a ``MambaLM``: one FSDP unit per ``Block``.

    Args:
        state_dict_type: ``full`` (one ``.ckpt`` file gathered on rank 0) or ``sharded`` (a
            directory per checkpoint, every rank writes its shard: fast for large models).
        sharding_strategy: ``FULL_SHARD`` (ZeRO-3-like), ``SHARD_GRAD_OP`` (ZeRO-2-like),
            ``NO_SHARD``, ``HYBRID_SHARD``.
        param_dtype, reduce_dtype: FSDP ``MixedPrecision`` compute/all-gather and gradient
            reduce-scatter dtypes; fp32 by default (bf16 compute comes from autocast). See the
            ``strategies`` package docstring for why ``param_dtype=bfloat16`` is refused.
        sync_module_states: broadcast rank 0's freshly initialised weights to every rank.
        allow_low_precision_params: ``${train.allow_low_precision_params}``.
        kwargs: passed to ``FSDPStrategy`` (and on to ``FullyShardedDataParallel``).
    """
    from mamba_train.models.lm import Block  # models/ stays importable without Lightning

    pdt = parse_dtype(param_dtype, "strategy.param_dtype", ParallelConfigError)
    rdt = parse_dtype(reduce_dtype, "strategy.reduce_dtype", ParallelConfigError)
    if pdt != torch.float32:
        refuse_low_precision(f"FSDP with param_dtype={param_dtype}", allow_low_precision_params)
    if state_dict_type not in ("full", "sharded"):
        raise ParallelConfigError("strategy.state_dict_type must be 'full' or 'sharded', "
                                  f"got {state_dict_type!r}")
    return MambaFSDPStrategy(
        auto_wrap_policy={Block},
        mixed_precision=MixedPrecision(param_dtype=pdt, reduce_dtype=rdt, buffer_dtype=torch.float32),
        sharding_strategy=sharding_strategy,
        state_dict_type=state_dict_type,
        cpu_offload=cpu_offload,
        use_orig_params=True,
        sync_module_states=sync_module_states,
        **kwargs,
    )
