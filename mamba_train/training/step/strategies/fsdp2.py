"""FSDP2 (``torch.distributed.fsdp.fully_shard``) on a (data_parallel, context_parallel) device
mesh, built on Lightning's ``ModelParallelStrategy``.

``strategy=fsdp2 strategy.context_parallel_size=N``: the world is split into groups of N ranks
that hold one sequence between them (each a contiguous slice, joined exactly by state passing:
``mamba_train/parallel/context_parallel.py``); data-parallel size = world size / N. Parameters,
gradients and optimizer state are sharded over all ranks (one ``fully_shard`` unit per ``Block``
plus the root), as torchtitan shards over its flattened data-parallel x context-parallel mesh;
gradients are averaged over all ranks, which with the context-parallel loss weighting is the
gradient of the whole-sequence mean. ``context_parallel_size=1`` is plain FSDP2.

Data: every rank of a context-parallel group gets the same windows (the loader is sharded over
the data-parallel dimension only: ``distributed_sampler_kwargs``), and ``batch_to_device`` cuts
each rank's slice. ``data.seq_len`` is the whole window, so ``train.global_batch_tokens`` keeps
its meaning (micro_batch x seq_len x world_size / N x accumulation, and seq_len / N per rank).

Checkpoints: ``state_dict_type=full`` gathers one ordinary ``.ckpt`` on rank 0 (resumable on any
strategy, world size or context-parallel size; exportable); ``sharded`` writes one shard per rank.
Parameters stay fp32 (bf16 compute from autocast under ``precision=bf16-mixed``), the project's
precision policy (``strategies/__init__.py``).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lightning.pytorch.strategies import ModelParallelStrategy

from mamba_train.formats.checkpoint import load_checkpoint_dict, optimizer_state_in_group_order
from mamba_train.training.step.strategies.policy import ParallelConfigError


class MambaFSDP2Strategy(ModelParallelStrategy):
    def __init__(self, context_parallel_size: int = 1, reshard_after_forward: bool = True,
                 state_dict_type: str = "full", **kwargs: Any):
        if int(context_parallel_size) < 1:
            raise ParallelConfigError("strategy.context_parallel_size must be >= 1, "
                                      f"got {context_parallel_size}")
        if state_dict_type not in ("full", "sharded"):
            raise ParallelConfigError("strategy.state_dict_type must be 'full' or 'sharded', "
                                      f"got {state_dict_type!r}")
        super().__init__(save_distributed_checkpoint=state_dict_type == "sharded", **kwargs)
        self.context_parallel_size = int(context_parallel_size)
        self.reshard_after_forward = bool(reshard_after_forward)
        self.context_parallel = None  # parallel.context_parallel.ContextParallel when N > 1
        self._shard_mesh = None

    # ------------------------------------------------------------------ mesh
    def setup_environment(self) -> None:
        from torch.distributed.device_mesh import init_device_mesh

        world = self.num_nodes * self.num_processes
        cp = self.context_parallel_size
        if world % cp:
            raise ParallelConfigError(
                f"strategy.context_parallel_size={cp} does not divide the world size {world} "
                "(trainer.devices x trainer.num_nodes); pick a divisor")
        # Lightning's (data_parallel, tensor_parallel) mesh is built with our sizes first
        self._data_parallel_size, self._tensor_parallel_size = world // cp, cp
        super().setup_environment()
        device = self.root_device.type
        self._device_mesh = init_device_mesh(device, (world // cp, cp),
                                             mesh_dim_names=("data_parallel", "context_parallel"))
        self.lightning_module._device_mesh = self._device_mesh
        self._shard_mesh = init_device_mesh(device, (world,), mesh_dim_names=("shard",))

    @contextmanager
    def tensor_init_context(self, empty_init: bool | None = None):
        # build_model already builds on the meta device and initialises once; the same seed then
        # gives every rank (and a one-process run) the same weights before they are sharded
        with self.precision_plugin.tensor_init_context():
            yield

    # ------------------------------------------------------------------ model
    def setup(self, trainer) -> None:
        from torch.distributed.fsdp import fully_shard

        model = self.lightning_module.model
        if self.context_parallel_size > 1:
            from mamba_train.parallel.context_parallel import ContextParallel
            self.context_parallel = ContextParallel(self._device_mesh["context_parallel"].get_group())
            self.context_parallel.install(model)
        if self._shard_mesh.size() > 1:
            for block in model.backbone.layers:
                fully_shard(block, mesh=self._shard_mesh,
                            reshard_after_forward=self.reshard_after_forward)
            fully_shard(model, mesh=self._shard_mesh, reshard_after_forward=self.reshard_after_forward)
        super().setup(trainer)

    def optimizer_state(self, optimizer) -> dict:
        """The full optimizer state in torch's own format (state keyed by the position of each
        parameter in the optimizer's groups), so that any strategy resumes it. Lightning's
        re-keying follows ``model.parameters()`` order, which is not the order of our groups
        (weight decay by name)."""
        if self._save_distributed_checkpoint:
            return super().optimizer_state(optimizer)
        from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                             get_optimizer_state_dict)

        optimizer = getattr(optimizer, "_optimizer", optimizer)  # LightningOptimizer
        full = get_optimizer_state_dict(self.model, optimizer, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True))
        if self.global_rank != 0:
            return {}
        index: dict[str, int] = {}
        groups = []
        for group in full["param_groups"]:
            ids = [index.setdefault(fqn, len(index)) for fqn in group["params"]]
            groups.append({**group, "params": ids})
        return {"state": {index[fqn]: v for fqn, v in full["state"].items()},
                "param_groups": groups}

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict:
        """A full ``.ckpt`` (from any strategy or world size) into the sharded model and
        optimizer; its optimizer state is matched to the parameters by the optimizer's own group
        order (``optimizer_state``), as torch's format means it."""
        from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                             set_model_state_dict,
                                                             set_optimizer_state_dict)

        path = Path(self.broadcast(str(checkpoint_path)))
        if not path.is_file():
            return super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        # the package's one loader: tensors and plain data only, whatever ``weights_only`` says
        checkpoint = load_checkpoint_dict(path)
        options = StateDictOptions(full_state_dict=True,
                                   strict=self.lightning_module.strict_loading)
        set_model_state_dict(self.model, checkpoint.pop("state_dict"), options=options)
        fqn = {id(p): n for n, p in self.model.named_parameters()}
        for optimizer, state in zip(self.optimizers, checkpoint.pop("optimizer_states", [])):
            optimizer = getattr(optimizer, "_optimizer", optimizer)
            state = optimizer_state_in_group_order(state, optimizer, self.model.parameters())
            names = [fqn[id(p)] for group in optimizer.param_groups for p in group["params"]]
            groups = [{**g, "params": [names[i] for i in g["params"]]}
                      for g in state["param_groups"]]
            by_name = {"state": {names[i]: v for i, v in state["state"].items()},
                       "param_groups": groups}
            set_optimizer_state_dict(self.model, optimizer, by_name, options=options)
        return checkpoint

    def batch_to_device(self, batch, device=None, dataloader_idx: int = 0):
        batch = super().batch_to_device(batch, device, dataloader_idx)
        if self.context_parallel is not None and isinstance(batch, dict):
            batch = self.context_parallel.slice(batch)
        return batch


def fsdp2_strategy(context_parallel_size: int = 1, reshard_after_forward: bool = True,
                   state_dict_type: str = "full", **kwargs: Any) -> MambaFSDP2Strategy:
    """``strategy=fsdp2``: see the module docstring. ``kwargs`` go to ``ModelParallelStrategy``."""
    return MambaFSDP2Strategy(context_parallel_size=context_parallel_size,
                              reshard_after_forward=reshard_after_forward,
                              state_dict_type=state_dict_type, **kwargs)
