"""FSDP for a ``MambaLM``: one FSDP unit per ``Block``, fp32 parameters and gradient reduction
(bf16 compute from autocast); see ``strategies/__init__.py`` for the precision policy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch.distributed.fsdp import MixedPrecision

from mamba_train.dtypes import parse_dtype
from mamba_train.formats.checkpoint import load_checkpoint_dict, optimizer_state_in_group_order
from mamba_train.training.lightning_compat import fsdp_full_state_dict_context, load_full_module_state
from mamba_train.training.step.strategies.cpu_shims import FSDPOnCPU
from mamba_train.training.step.strategies.policy import ParallelConfigError, refuse_low_precision


class MambaFSDPStrategy(FSDPOnCPU, FSDPStrategy):
    """Lightning's FSDPStrategy, also on CPU processes over gloo (the CPU tests:
    ``cpu_shims.FSDPOnCPU``). Gradients are clipped by global norm in the training step
    (``training/step/train_step.py``: FSDP's own ``clip_grad_norm_`` on the root module)."""

    def optimizer_state(self, optimizer) -> dict:
        """A full checkpoint's optimizer state numbered as torch numbers it (group order), so
        that every strategy resumes it; Lightning numbers it in ``model.parameters()`` order."""
        state = super().optimizer_state(optimizer)
        if self._state_dict_type != "full" or self.global_rank != 0:
            return state
        optimizer = getattr(optimizer, "_optimizer", optimizer)  # LightningOptimizer
        return optimizer_state_in_group_order(state, optimizer, self.model.parameters())

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict:
        """A full ``.ckpt`` from any strategy. Lightning's loader reads numbered optimizer states
        as positions in ``model.parameters()`` (its own FSDP numbering); torch's numbering (group
        order) is what every strategy here writes, and what is named through the optimizer."""
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp import OptimStateKeyType

        path = Path(self.broadcast(str(checkpoint_path)))
        if not path.is_file():  # a sharded checkpoint directory
            return super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        # the package's one loader: tensors and plain data only, whatever ``weights_only`` says
        checkpoint = load_checkpoint_dict(path)
        load_full_module_state(checkpoint.pop("state_dict"), self.model, self.world_size,
                               strict=self.lightning_module.strict_loading)
        states = checkpoint.get("optimizer_states")
        if not states or self.lightning_module.trainer.state.fn != "fit":
            return checkpoint
        with fsdp_full_state_dict_context(self.model, self.world_size, rank0_only=False):
            for optimizer, state in zip(self.optimizers, states):
                if all(isinstance(k, int) for k in state["state"]):
                    state = optimizer_state_in_group_order(state, optimizer, self.model.parameters())
                    state = FSDP.rekey_optim_state_dict(state,
                                                        OptimStateKeyType.PARAM_NAME, self.model,
                                                        optim=optimizer)
                optimizer.load_state_dict(FSDP.optim_state_dict_to_load(
                    model=self.model, optim=optimizer, optim_state_dict=state))
        return checkpoint


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
