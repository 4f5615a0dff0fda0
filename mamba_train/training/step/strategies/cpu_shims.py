"""Shims that let the FSDP and DeepSpeed strategies run on CPU processes over gloo.

Why they exist: the multi-process strategy tests (tests/test_distributed.py) run on CPU-only
machines, where Lightning refuses these strategies (it checks for CUDA) and FSDP/DeepSpeed need a
device index that CPUs do not have. On a CUDA device every method here defers to Lightning's own
code unchanged, so training on GPUs never goes through them. They override private Lightning
hooks (``_setup_model``, ``_setup_model_and_optimizer``, ``_full_state_dict_context``): no public
hook lets a subclass change how the wrapped model is built (see ``training/lightning_compat.py``).
"""

from __future__ import annotations

import argparse
import os

import torch
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.strategies import DeepSpeedStrategy
from torch import nn


class FSDPOnCPU:
    """Mixin for ``FSDPStrategy``: FSDP accepts CPU modules only with ``device_id=cpu`` (Lightning
    passes the CUDA index, None on CPU), and Lightning's full-state-dict context offloads to CPU,
    which segfaults (torch 2.13) when the flat parameters already live on CPU."""

    def _cpu_full_state_dict(self) -> bool:
        return self.root_device.type == "cpu" and self._state_dict_type == "full"

    def _full_state_dict_context(self):
        from torch.distributed.fsdp import (FullOptimStateDictConfig, FullStateDictConfig,
                                            FullyShardedDataParallel, StateDictType)

        return FullyShardedDataParallel.state_dict_type(
            self.model, StateDictType.FULL_STATE_DICT,
            FullStateDictConfig(offload_to_cpu=False, rank0_only=True),
            FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=True))

    def lightning_module_state_dict(self):
        if not self._cpu_full_state_dict():
            return super().lightning_module_state_dict()
        with self._full_state_dict_context():
            return self.model.state_dict()

    def optimizer_state(self, optimizer):
        if not self._cpu_full_state_dict():
            return super().optimizer_state(optimizer)
        from torch.distributed.fsdp import FullyShardedDataParallel, OptimStateKeyType

        optimizer = getattr(optimizer, "_optimizer", optimizer)  # LightningOptimizer
        with self._full_state_dict_context():
            state = FullyShardedDataParallel.optim_state_dict(self.model, optimizer)
            if self.global_rank == 0:  # the standard (param id) format, as Lightning saves it
                state = FullyShardedDataParallel.rekey_optim_state_dict(
                    state, OptimStateKeyType.PARAM_ID, self.model)
            return state

    def _setup_model(self, model: nn.Module) -> nn.Module:
        if self.root_device.type != "cpu":
            return super()._setup_model(model)
        from torch.distributed.fsdp import FullyShardedDataParallel

        if not any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
            kwargs = dict(self.kwargs)
            if kwargs.pop("sync_module_states", False):  # FSDP does it on GPUs only
                with torch.no_grad():
                    for t in [*model.parameters(), *model.buffers()]:
                        torch.distributed.broadcast(t.data, src=0)
            model = FullyShardedDataParallel(
                module=model, cpu_offload=self.cpu_offload,
                mixed_precision=self.mixed_precision_config,
                sharding_strategy=self.sharding_strategy, device_id=self.root_device,
                **kwargs)
        return model


class DeepSpeedOnCPU:
    """Mixin for ``DeepSpeedStrategy`` with ``allow_cpu``: DeepSpeed's CPU accelerator over gloo
    (Lightning allows CUDA only). ``self._allow_cpu`` is set by the strategy's constructor."""

    def _on_cpu(self) -> bool:
        return self._allow_cpu and isinstance(self.accelerator, CPUAccelerator)

    def setup_environment(self) -> None:
        if self._on_cpu():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
            super(DeepSpeedStrategy, self).setup_environment()  # DDPStrategy's, no CUDA check
            return
        super().setup_environment()

    def setup_distributed(self) -> None:
        if not self._on_cpu():
            return super().setup_distributed()
        from lightning.fabric.utilities.seed import reset_seed

        import deepspeed.ops

        # DeepSpeed would JIT-compile its shared-memory all-reduce for CPU here (~1 min of
        # ninja on first use); plain gloo collectives are enough for CPU runs.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        reset_seed()  # as Lightning's, without its check that CUDA device indices match ranks
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    def _setup_model_and_optimizer(self, model, optimizer, lr_scheduler=None):
        if not self._on_cpu():
            return super()._setup_model_and_optimizer(model, optimizer, lr_scheduler)
        import deepspeed

        engine, ds_optimizer, _, _ = deepspeed.initialize(  # as Lightning's, CPU has no device index
            args=argparse.Namespace(device_rank=self.local_rank), config=self.config,
            model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
            optimizer=optimizer, lr_scheduler=lr_scheduler, dist_init_required=False)
        return engine, ds_optimizer
