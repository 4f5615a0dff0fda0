"""A CUDA-graph-captured forward + backward for the training step (``module.cuda_graph``).

Why: Mamba-2's step is bound by the host enqueueing its many small Triton kernels, not by the
GPU (benchmarks/results/2026-11-23-captured-step-throughput.md profiles it eager and captured; the
PyTorch guide to CUDA graphs, https://pytorch.org/docs/stable/notes/cuda.html#cuda-graphs, explains
why launch-bound steps gain). ``torch.compile`` cannot capture it for us -- mamba_ssm's kernels
are not registered custom ops -- so the graph is captured by hand with ``torch.cuda.graph``.

How it sits in the training step (``training/step/train_step.py``, which calls ``forward_backward`` per
micro-batch and ``sync_gradients`` / ``zero_grad`` once per optimizer step):

* ``forward_backward`` copies the micro-batch into static input buffers and replays the graph,
  which runs the forward, the loss (scaled by 1/accumulation) and the backward. With gradient
  accumulation or DDP the gradients accumulate in place into one flat fp32 buffer whose views
  are the parameters' ``.grad``. With neither, the graph owns the gradient tensors: captured
  with ``.grad`` unset, the backward allocates them in the graph's pool and each replay
  overwrites them, which saves zeroing and an add over every gradient per step (2.6 ms of a
  243 ms mamba-370m step on an H100, benchmarks/results/2026-11-23-captured-step-throughput.md).
* Lightning's backward is a no-op for these micro-batches (the graph did it); under DDP the
  flat buffer is all-reduced by ``sync_gradients`` once per optimizer step, outside the graph
  (one collective, with no reducer hooks: DDP's own gradient sync is switched off). With
  accumulation 1, ``module.cuda_graph_allreduce=inside`` captures that all-reduce into the
  graph instead (NCCL collectives can be captured); benchmarks/scaling.py measures both.
* ``zero_grad`` zeroes the flat buffer in place after each optimizer step, never setting it to
  None: the graph writes into those exact addresses.
* Clipping (``clip_grad_norm_``, a few foreach kernels) and the fused AdamW step stay eager: with
  a float LR read at every step the schedule needs no device tensor, and the optimizer state and
  checkpoints are the eager ones, so resume stays exact.

The first ``warmup`` micro-steps run eagerly on a side stream (the mamba_ssm Triton autotuning
and lazy cuBLAS set-up must not happen during capture) and are real training steps: no batch
is spent on warm-up. Where capture is impossible the step stays eager and says why:
``graph_blockers`` lists the configuration reasons; a failed capture (``auto``) or a batch of
another shape falls back to the eager step.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Callable

import torch
import torch.distributed as dist

from mamba_train.errors import MambaTrainError

log = logging.getLogger(__name__)

GRAPH_MODES = ("auto", "on", "off")
ALLREDUCE_PLACES = ("outside", "inside")


class CudaGraphError(MambaTrainError, RuntimeError):
    """``module.cuda_graph=on`` where the step cannot be captured."""


def graph_blockers(trainer, module) -> list[str]:
    """Reasons this run's training step cannot be captured (empty: it can)."""
    reasons = []
    strategy = trainer.strategy
    if strategy.root_device.type != "cuda":
        reasons.append(f"the device is {strategy.root_device.type} (CUDA graphs are for GPUs)")
    if module.train_step.kind != "replicated":  # training/step/train_step.py: strategy_kind
        reasons.append(f"{type(strategy).__name__} gathers or partitions parameters and "
                       "gradients inside the step; only single-device and DDP steps are captured")
    if getattr(trainer.datamodule, "document_boundaries", False) and any(
            getattr(m, "varlen_needs_host_sync", False) for m in module.modules()):
        reasons.append("the fused Mamba-3 kernel and varlen attention take document boundaries "
                       "as cu_seqlens, whose length (the document count) is read on the host "
                       "every micro-batch")
    params = [p for p in module.parameters() if p.requires_grad]
    if len({(p.dtype, p.device) for p in params}) > 1:
        reasons.append("the trainable parameters differ in dtype or device")
    return reasons


def start_graph_step(trainer, module, mode: str) -> tuple[GraphedTrainStep | None, str]:
    """The graph step for this run, or None and the reason the step stays eager.

    ``mode="on"`` raises where ``auto`` would stay eager. Under DDP the wrapper's own gradient
    sync is switched off: the graph step all-reduces its flat buffer itself."""
    from lightning.pytorch.utilities import rank_zero_info

    if mode == "off":
        return None, "eager: module.cuda_graph=off"
    blockers = graph_blockers(trainer, module)
    if blockers:
        if mode == "on":
            raise CudaGraphError("module.cuda_graph=on, but the step cannot be captured: "
                                 + "; ".join(blockers) + ". Set module.cuda_graph=auto or off.")
        if trainer.strategy.root_device.type == "cuda":  # on a CPU eager is simply the step
            rank_zero_info(f"cuda_graph=auto: eager training step ({'; '.join(blockers)})")
        return None, "eager: " + "; ".join(blockers)
    strategy = trainer.strategy
    if mode == "auto" and getattr(trainer, "num_nodes", 1) > 1:
        # DDP's bucketed all-reduce overlaps the backward; the graph step's one all-reduce of
        # all gradients does not, which across nodes can cost more than the graph saves
        # (measured within one node only: 2xH200, benchmarks/results/2026-11-23-scaling-2gpu.md)
        reason = ("eager: across nodes DDP's overlapped all-reduce is kept "
                  "(module.cuda_graph=on captures anyway)")
        rank_zero_info(f"cuda_graph=auto: {reason}")
        return None, reason
    ddp = getattr(strategy, "model", None)
    if isinstance(ddp, torch.nn.parallel.DistributedDataParallel):
        ddp.require_backward_grad_sync = False
        # DDP keeps the AccumulateGrad nodes it made on the default stream, while the warm-up
        # and the capture run on side streams (as capture requires): torch warns about that
        # stream mismatch on every rank, but it is expected here and the capture is unaffected
        # (2xH200: the captured DDP step matched the 1-GPU losses,
        # benchmarks/results/2026-11-23-scaling-2gpu.md)
        warn = getattr(torch.autograd.graph, "set_warn_on_accumulate_grad_stream_mismatch", None)
        if warn is not None:
            warn(False)
    reduce_in_graph = trainer.world_size > 1 and module.cuda_graph_allreduce == "inside"
    if reduce_in_graph and trainer.accumulate_grad_batches > 1:
        raise CudaGraphError(
            "module.cuda_graph_allreduce=inside needs gradient accumulation 1 (every replay "
            f"ends an optimizer step), but this run accumulates {trainer.accumulate_grad_batches} "
            "micro-batches; set module.cuda_graph_allreduce=outside or raise data.micro_batch_size")
    params = [p for group in trainer.optimizers[0].param_groups for p in group["params"]]
    step = GraphedTrainStep(module._loss, params, accumulate=trainer.accumulate_grad_batches,
                            mode=mode, process_group=getattr(strategy, "process_group", None),
                            world_size=trainer.world_size, reduce_in_graph=reduce_in_graph)
    return step, ""


class GraphedTrainStep:
    """Forward + backward of one micro-batch: eager for ``warmup`` micro-steps, then replayed
    from a CUDA graph (only eager on devices without CUDA graphs, which tests use to check the
    flat-gradient bookkeeping on CPU)."""

    def __init__(self, loss_fn: Callable[[dict], torch.Tensor], params: list[torch.nn.Parameter],
                 accumulate: int, mode: str = "auto", warmup: int = 3,
                 process_group=None, world_size: int = 1, reduce_in_graph: bool = False):
        self.loss_fn = loss_fn
        self.params = params
        self.loss_scale = 1.0 / accumulate
        self.mode = mode
        self.warmup = warmup
        self.process_group = process_group
        self.world_size = world_size
        # all-reduce inside the graph: only where each replay ends an optimizer step
        self.reduce_in_graph = reduce_in_graph and world_size > 1 and accumulate == 1
        self._reduced = False  # whether this step's gradients are already averaged over ranks
        device = params[0].device
        self.capturable = device.type == "cuda"
        # the graph owns the gradients where nothing accumulates into them or reduces them
        self.graph_owns_grads = accumulate == 1 and world_size == 1
        self.flat_grad: torch.Tensor | None = None
        self._grad_views: list[torch.Tensor] = []
        if not self.graph_owns_grads:
            self.flat_grad = torch.zeros(sum(p.numel() for p in params), dtype=params[0].dtype,
                                         device=device)
            offset = 0
            for p in params:
                self._grad_views.append(self.flat_grad[offset:offset + p.numel()].view_as(p))
                offset += p.numel()
            self.bind_grads()
        self.micro_steps = 0
        self.fallback_reason: str | None = None
        self._static: dict[str, torch.Tensor] | None = None
        self._steps_at_shape = 0  # eager micro-steps run with the current static shapes
        self._static_loss: torch.Tensor | None = None
        self._graph: torch.cuda.CUDAGraph | None = None
        self.replays = 0
        self._side_stream = torch.cuda.Stream(device) if self.capturable else None
        self._warned_shape = False

    # ------------------------------------------------------------------ gradients
    def bind_grads(self) -> None:
        """Point every ``p.grad`` at the tensor the graph writes: its slice of the flat buffer,
        or (graph-owned, once captured) the tensor the captured backward allocated. Anything
        that set ``.grad`` to None meanwhile would otherwise make the optimizer skip it."""
        for p, g in zip(self.params, self._grad_views):
            if p.grad is not g:
                p.grad = g

    def zero_grad(self) -> None:
        """Gradients of the next micro-batch start from zero.

        Graph-owned gradients are not touched once captured: the next replay overwrites them
        (an eager micro-step after the capture zeroes them itself, see ``_eager``). Before the
        capture they are dropped, as Lightning does, so that the capture finds them unset."""
        if self.flat_grad is not None:
            self.flat_grad.zero_()
            self.bind_grads()
        elif not self.captured:
            for p in self.params:
                p.grad = None

    def sync_gradients(self) -> None:
        """Average the gradients over the data-parallel ranks: one all-reduce of the flat buffer
        per optimizer step, outside the graph (unless the replay just did it inside)."""
        if self.world_size > 1 and not self._reduced:
            self._all_reduce()

    def _all_reduce(self) -> None:
        dist.all_reduce(self.flat_grad, group=self.process_group)
        self.flat_grad.div_(self.world_size)

    def release(self) -> None:
        """Free the graph, its memory pool and the static buffers; gradients back to None."""
        self._graph = self._static = self._static_loss = None
        if self.graph_owns_grads:
            self._grad_views = []
        for p in self.params:
            p.grad = None

    # ------------------------------------------------------------------ the step
    @property
    def captured(self) -> bool:
        return self._graph is not None

    def describe(self) -> str:
        """How the micro-steps ran, for logs and the run summary."""
        if self.replays:
            grads = "owned by the graph" if self.graph_owns_grads else "in one flat buffer"
            return (f"cuda graph: {self.replays} of {self.micro_steps} micro-steps replayed "
                    f"(warm-up {self.warmup}; gradients {grads})")
        if self.fallback_reason:
            return f"eager: capture failed ({self.fallback_reason})"
        if not self.capturable:
            return "eager: graph-step bookkeeping without CUDA graphs (not a CUDA device)"
        return "eager: not captured yet"

    def forward_backward(self, batch: dict) -> torch.Tensor:
        """Accumulate this micro-batch's gradients (scaled by 1/accumulation) into ``p.grad``
        and return its loss, detached (a fresh tensor: the static one is overwritten). The
        gradients start from zero after ``zero_grad`` (called once per optimizer step)."""
        self.micro_steps += 1
        self._reduced = False
        if not self._fill_static(batch):
            return self._eager(batch).clone()
        if self.captured:
            self._graph.replay()
            self.replays += 1
            self._reduced = self.reduce_in_graph
            if self.graph_owns_grads:
                self.bind_grads()
            return self._static_loss.clone()
        self._steps_at_shape += 1
        if not self.capturable or self.fallback_reason or self._steps_at_shape <= self.warmup:
            return self._eager(self._static).clone()
        return self._capture_and_replay()

    def _fits(self, batch: dict) -> bool:
        return batch.keys() == self._static.keys() and all(
            v.shape == self._static[k].shape and v.dtype == self._static[k].dtype
            for k, v in batch.items())

    def _fill_static(self, batch: dict) -> bool:
        """Copy the batch into the static buffers; False if its shapes do not fit them.

        Until the capture the buffers follow the batches (a resumed run may start on an
        epoch's short last batch), and the warm-up count restarts with each new shape: the
        captured shape must have been autotuned outside the capture."""
        if self._static is None or (not self.captured and not self._fits(batch)):
            self._static = {k: torch.empty_like(v) for k, v in batch.items()}
            self._steps_at_shape = 0
        if not self._fits(batch):
            if not self._warned_shape:
                log.warning("cuda_graph: a batch of other shapes/keys than the captured one "
                            "(%s); it runs eagerly", {k: tuple(v.shape) for k, v in batch.items()})
                self._warned_shape = True
            return False
        for k, v in batch.items():
            self._static[k].copy_(v, non_blocking=True)
        return True

    def _autocast_without_cache(self):
        # autocast's cast cache must be off while capturing (its cached bf16 weight copies would
        # be freed when the autocast region exits, under the graph's feet); keep the same
        # setting in the eager micro-steps so both run the same casts.
        device = self.params[0].device.type
        if not torch.is_autocast_enabled(device):
            return contextlib.nullcontext()
        return torch.autocast(device, dtype=torch.get_autocast_dtype(device), cache_enabled=False)

    def _forward_backward(self, batch: dict, all_reduce: bool = False) -> torch.Tensor:
        with self._autocast_without_cache():
            loss = self.loss_fn(batch)
        (loss * self.loss_scale).backward()
        if all_reduce:
            self._all_reduce()
        return loss.detach()

    def _eager(self, batch: dict) -> torch.Tensor:
        if self.graph_owns_grads and self.captured:
            # the graph's gradient tensors still hold the last replay's values; the backward
            # accumulates into them, and they must stay the tensors the graph writes to
            self.bind_grads()
            torch._foreach_zero_([p.grad for p in self.params if p.grad is not None])
        if self._side_stream is None or self.fallback_reason:
            return self._forward_backward(batch)
        # warm-up on a side stream, as CUDA graph capture requires
        main = torch.cuda.current_stream()
        self._side_stream.wait_stream(main)
        with torch.cuda.stream(self._side_stream):
            loss = self._forward_backward(batch)
        main.wait_stream(self._side_stream)
        return loss

    def _capture_and_replay(self) -> torch.Tensor:
        graph = torch.cuda.CUDAGraph()
        if self.graph_owns_grads:
            self.zero_grad()  # unset: the captured backward allocates them in the graph's pool
        try:
            # thread_local: the DataLoader's pin-memory thread keeps using CUDA meanwhile
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self._static_loss = self._forward_backward(self._static, all_reduce=self.reduce_in_graph)
        except Exception as e:  # noqa: BLE001 -- any capture failure means: run eagerly
            reason = f"{type(e).__name__}: {e}".splitlines()[0]
            if self.mode == "on":
                raise CudaGraphError(
                    f"module.cuda_graph=on but capturing the training step failed ({reason}); "
                    "set module.cuda_graph=auto (falls back to eager) or off") from e
            self.fallback_reason = reason
            self._static_loss = None
            torch.cuda.synchronize()
            log.warning("cuda_graph=auto: capture failed (%s); training continues eagerly", reason)
            return self._eager(self._static).clone()
        self._graph = graph
        if self.graph_owns_grads:
            self._grad_views = [p.grad for p in self.params]
        log.info("cuda_graph: training step captured after %d eager micro-steps", self.warmup)
        graph.replay()  # capture only records: this micro-batch is computed now
        self.replays += 1
        self._reduced = self.reduce_in_graph
        return self._static_loss.clone()
