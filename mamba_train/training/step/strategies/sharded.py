"""Strategy-aware model building and un-sharded parameter access (FSDP, DeepSpeed ZeRO-3).

The init guard (``callbacks/init_guard.py``) reads the SSM parameters through
:func:`gathered_parameters`; :func:`build_model_for` builds the model under ZeRO-3's partitioned
init and re-runs the mamba_ssm init on gathered parameters.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Iterator

import torch
from torch import nn


def _is_zero3(strategy) -> bool:
    try:
        from lightning.pytorch.strategies import DeepSpeedStrategy
    except ImportError:  # pragma: no cover
        return False
    return isinstance(strategy, DeepSpeedStrategy) and bool(strategy.config) and strategy.zero_stage_3


def _offload_full_params(strategy) -> bool:
    """Gather FSDP's full parameters into CPU memory (no GPU memory needed) -- except where
    nothing is sharded: FSDP turns FULL_SHARD into NO_SHARD at world size 1, and torch refuses
    ``offload_to_cpu=True`` with NO_SHARD (``NotImplementedError``); the parameters are whole
    on the device there already."""
    from torch.distributed.fsdp import ShardingStrategy

    sharding = getattr(strategy, "sharding_strategy", None)
    unsharded = strategy.world_size == 1 or sharding == ShardingStrategy.NO_SHARD
    return strategy.root_device.type == "cuda" and not unsharded


def _is_fsdp(strategy) -> bool:
    from lightning.pytorch.strategies import FSDPStrategy
    return isinstance(strategy, FSDPStrategy)


def build_model_for(strategy, config, backend: str = "auto",
                    weights: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """``build_model`` as the strategy needs it (called from ``configure_model``).

    With ``weights`` (a full state dict: ``init_from``) no init runs: they are assigned into a
    meta skeleton (``checkpoint.model_from_state_dict``) or, under ZeRO-3, copied into the
    gathered parameters in place of ``reset_parameters``.

    * ZeRO-3: Lightning runs ``configure_model`` inside ``deepspeed.zero.Init``, which partitions
      every parameter as its module is constructed, so an init afterwards would write into empty
      shards. The modules are constructed normally (not on the meta device, which zero.Init
      cannot partition), then ``reset_parameters`` re-runs the full mamba_ssm init on gathered
      parameters (rank 0's values are kept and re-partitioned). The tied/untied LM head weight
      is used inside ``MambaLM.forward`` (chunked loss) rather than by calling ``lm_head``, so
      it is registered as an external parameter of the model.
    * everything else: the usual meta build + ``to_empty`` + init (FSDP shards it afterwards,
      with ``sync_module_states`` making rank 0's init everyone's).
    """
    from mamba_train.models.build import build_model
    from mamba_train.models.lm import MambaLM

    if not _is_zero3(strategy):
        if weights is not None:
            from mamba_train.formats.load import model_from_state_dict
            return model_from_state_dict(config, weights, backend=backend, source="init_from")
        return build_model(config, backend=backend)
    import deepspeed  # only ZeRO-3 gets here, so DeepSpeed is installed

    # Construction runs PyTorch's default inits (wasted, overwritten below); undo their RNG use
    # so the init draws are the same as build_model's (same seed -> same model on any strategy).
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        model = MambaLM(config, backend=backend)
    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0):
        if weights is None:
            model.reset_parameters()
        else:
            with torch.no_grad():
                for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
                    if name in weights:  # not the MoE statistics: no state dict carries them
                        tensor.copy_(weights[name])
    deepspeed.zero.register_external_parameter(model, model.lm_head.weight)
    return model


@contextmanager
def gathered_parameters(strategy, module: nn.Module,
                        params: list[nn.Parameter] | None = None) -> Iterator[nn.Module]:
    """Read-only full (un-sharded) parameters of ``module`` on every rank inside the block.

    FSDP: ``summon_full_params`` on the root FSDP module (every parameter; offloaded to CPU on
    GPUs, so no GPU memory is needed). DeepSpeed ZeRO-3: ``GatheredParameters`` of ``params``
    (default: all of ``module``'s). Other strategies: nothing to do. A collective: every rank
    must enter it.
    """
    if strategy is not None and _is_fsdp(strategy) and strategy.model is not None:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        root = strategy.model
        if isinstance(root, FSDP):
            with FSDP.summon_full_params(root, writeback=False,
                                         offload_to_cpu=_offload_full_params(strategy)):
                yield module
            return
    if strategy is not None and _is_zero3(strategy):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params if params is not None else list(module.parameters()),
                                               modifier_rank=None):
            yield module
        return
    with nullcontext():
        yield module
