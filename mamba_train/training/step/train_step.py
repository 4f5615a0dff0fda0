"""The training step: one optimizer step of the run, in the order it happens.

Lightning owns the loop (data, validation cadence, checkpoints, loggers, strategies) and
automatic optimization: it feeds every micro-batch of an accumulation window to
``training_step`` and calls ``optimizer_step`` on the window's last one (with DDP it holds the
gradient all-reduce back until that micro-batch's backward). Both hooks hand over to this
object, so what one optimizer step does is read here, top to bottom:

1. ``forward_backward(batch)`` for each micro-batch: the loss, and its backward -- run by the
   captured CUDA graph (``cuda_graph.py``), or by Lightning right after ``training_step``
   returns the loss (scaled by 1/accumulation, the captured step scales the same way; DeepSpeed's
   engine is told not to scale it again: ``strategies/deepspeed.py``).
2. ``step(closure)`` on the last micro-batch: its forward/backward (``closure``), the gradient
   sync, ``on_before_optimizer_step``, the non-finite decision (``nonfinite.py``), clipping
   (which returns the logged norm), the optimizer (or DeepSpeed engine) step, the LR schedule,
   zero_grad, and the step-ended signal (:attr:`TrainStep.ended`, read by callbacks through
   :func:`step_ended`).

Why not Lightning's manual optimization (one ``training_step`` per window): under FSDP a
backward inside ``training_step`` runs inside the root module's forward, which FSDP does not
support (Lightning-AI/pytorch-lightning#19626, #19685). Clipping, the scheduler and zero_grad
are therefore done here and Lightning's own versions are switched off in the module's hooks.

Strategy kinds (:func:`strategy_kind`, computed once per fit): ``replicated`` (one device,
DDP: every rank holds the full gradients), ``sharded`` (FSDP: each rank a shard, so norms and
the non-finite flag are agreed across ranks), ``engine`` (DeepSpeed: its engine accumulates,
clips and steps; the non-finite flag is recorded, not applied).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mamba_train.errors import MambaTrainError
from mamba_train.training.step.cuda_graph import GraphedTrainStep, start_graph_step
from mamba_train.training.step.nonfinite import NonFiniteGuard, NonFiniteLossError

KINDS = ("replicated", "sharded", "engine")


class StepSettingError(MambaTrainError, ValueError):
    """A strategy, precision or clipping setting the training step cannot run."""


def strategy_kind(strategy) -> str:
    """``replicated`` | ``sharded`` | ``engine`` (see the module docstring)."""
    from lightning.pytorch.strategies import (DDPStrategy, DeepSpeedStrategy, FSDPStrategy,
                                              ModelParallelStrategy, SingleDeviceStrategy)

    if isinstance(strategy, DeepSpeedStrategy):  # a DDPStrategy subclass: test it first
        return "engine"
    if isinstance(strategy, (FSDPStrategy, ModelParallelStrategy)):  # FSDP, FSDP2 (fsdp2.py)
        return "sharded"
    if isinstance(strategy, (DDPStrategy, SingleDeviceStrategy)):
        return "replicated"
    raise StepSettingError(f"strategy {type(strategy).__name__} is not supported; use "
                           "strategy=auto, ddp, fsdp, fsdp2 or deepspeed_zero{1,2,3}")


@dataclass
class StepResult:
    """What one optimizer step did (device tensors are read only where something is logged)."""

    number: int  # 1-based: the run's global_step after this step, as in checkpoint names
    loss: torch.Tensor  # mean loss of this rank's micro-batches
    grad_norm: torch.Tensor | None  # total norm before clipping (None: DeepSpeed gave none)
    lr: float  # the learning rate this step was taken with
    micro_batches: int
    samples: int  # on this rank
    tokens: int  # on this rank


def step_ended(pl_module) -> StepResult | None:
    """The optimizer step that the current micro-batch ended, or None (inside a window).

    The one "an optimizer step just ended" signal: callbacks call it in ``on_train_batch_end``."""
    step = getattr(pl_module, "train_step", None)
    return None if step is None else step.ended


class TrainStep:
    """Built by the module from its settings (``conf/module/default.yaml``), set up at fit start."""

    def __init__(self, loss_fn, nan_policy: str, max_consecutive_skips: int, cuda_graph: str):
        self.loss_fn = loss_fn
        self.cuda_graph = cuda_graph
        self.nonfinite = NonFiniteGuard(nan_policy, max_consecutive_skips)
        self.graph: GraphedTrainStep | None = None
        self.eager_reason = "eager: training has not started"
        self.ended: StepResult | None = None
        self.kind: str | None = None
        self._losses: list[torch.Tensor] = []
        self._samples = self._tokens = 0

    # ------------------------------------------------------------------ set-up (fit start)
    def setup(self, trainer, module) -> None:
        """Read the run's settings once: strategy kind, clipping, optimizer and schedule, and
        whether the forward/backward is captured."""
        self.trainer, self.module = trainer, module
        self.kind = strategy_kind(trainer.strategy)
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            raise StepSettingError("fp16 loss scaling (precision=16-mixed) is not supported: "
                                   "use precision=bf16-mixed (fp32 weights, bf16 compute)")
        if trainer.gradient_clip_algorithm not in (None, "norm"):
            raise StepSettingError("gradient clipping is by total norm only: set "
                                   "trainer.gradient_clip_algorithm=norm (or leave it unset)")
        if self.nonfinite.policy == "skip" and self.kind == "engine":
            raise NonFiniteLossError(
                "module.nan_policy=skip cannot skip a step under DeepSpeed (its engine applies "
                "the optimizer step itself); use module.nan_policy=stop or strategy=fsdp")
        self.clip_val = float(trainer.gradient_clip_val or 0.0)
        self.optimizer = trainer.optimizers[0]
        configs = trainer.lr_scheduler_configs
        self.scheduler = configs[0].scheduler if configs else None
        self.engine = trainer.strategy.model if self.kind == "engine" else None
        self.nonfinite.window = 2 * max(1, trainer.log_every_n_steps)
        self.ended, self._losses, self._samples, self._tokens = None, [], 0, 0
        if self.graph is None:
            self.graph, self.eager_reason = start_graph_step(trainer, module, self.cuda_graph)

    def describe(self) -> str:
        """How the forward/backward ran: captured in a CUDA graph or eager, and why."""
        return self.graph.describe() if self.graph is not None else self.eager_reason

    # ------------------------------------------------------------------ every micro-batch
    def forward_backward(self, batch: dict) -> torch.Tensor:
        """This micro-batch's loss; the captured step has also run its backward."""
        self.ended = None
        if self.graph is not None:
            loss = self.graph.forward_backward(batch)
        else:
            loss = self.loss_fn(batch)  # Lightning runs the backward of loss / accumulation
        self.nonfinite.note_loss(loss)  # a device flag: the step's fate is decided in step()
        self._losses.append(loss.detach())
        ids = batch["input_ids"]
        self._samples, self._tokens = self._samples + ids.shape[0], self._tokens + ids.numel()
        return loss

    # ------------------------------------------------------------------ the window's last micro-batch
    def step(self, closure) -> None:
        """One optimizer step, in order; Lightning calls it from ``optimizer_step``."""
        closure()  # the last micro-batch: forward_backward, then (eager) Lightning's backward
        if self.kind == "engine" and not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()  # DeepSpeed calls every micro-batch here; it counts them in step()
            return
        if self.graph is not None:
            self.graph.sync_gradients()  # its own all-reduce (eager DDP reduced in the backward)
        trainer, module, optimizer = self.trainer, self.module, self.optimizer
        for callback in trainer.callbacks:  # gradients complete, before any decision or clip
            callback.on_before_optimizer_step(trainer, module, optimizer)
        number = trainer.global_step + 1
        self.nonfinite.before_optimizer_step(optimizer, number, self._agree_across_ranks(),
                                             mask=self.kind != "engine")
        norm = self.clip()
        lr = float(optimizer.param_groups[0]["lr"])
        if self.kind == "engine":
            self.engine.step()  # clips (config "gradient_clipping") and zeroes the gradients
            norm = self._engine_norm()
        else:
            optimizer.step()  # the torch optimizer itself (not Lightning's wrapper, see above)
        if self.scheduler is not None:
            self.scheduler.step()
        self.zero_grad()
        self.ended = StepResult(number, torch.stack(self._losses).mean(), norm, lr,
                                len(self._losses), self._samples, self._tokens)
        self._losses, self._samples, self._tokens = [], 0, 0

    # ------------------------------------------------------------------ the parts of step()
    def _agree_across_ranks(self):
        """Sharded gradients: every rank must skip the same step, so the flag is summed."""
        if self.trainer.world_size == 1 or self.kind == "replicated":
            return None
        strategy = self.trainer.strategy
        return lambda flag: strategy.reduce(flag.float(), reduce_op="sum") > 0

    def clip(self) -> torch.Tensor | None:
        """Clip to ``trainer.gradient_clip_val`` (0/None: no clipping) and return the total
        norm before clipping: the one that is logged. DeepSpeed's engine clips in its step."""
        if self.kind == "engine":
            return None
        params = list(self.module.parameters())
        if self.kind == "sharded":
            root = self.trainer.strategy.model
            if hasattr(root, "clip_grad_norm_"):  # FSDP's own: the norm over all the shards
                return root.clip_grad_norm_(self.clip_val or float("inf"))
            # FSDP2: DTensor gradients, torch's clip reduces the norm over the ranks
            norm = torch.nn.utils.clip_grad_norm_(params, self.clip_val or float("inf"))
            return norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        if self.clip_val:
            return torch.nn.utils.clip_grad_norm_(params, self.clip_val)
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return None
        if hasattr(torch.nn.utils, "get_total_norm"):  # torch >= 2.6: one fused foreach norm
            return torch.nn.utils.get_total_norm(grads)
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))

    def _engine_norm(self) -> torch.Tensor | None:
        norm = self.engine.get_global_grad_norm()
        if norm is None:
            return None
        return torch.as_tensor(norm, dtype=torch.float32, device=self.module.device)

    def zero_grad(self) -> None:
        """Gradients of the next window start from zero (the graph keeps its buffer bound)."""
        if self.graph is not None:
            self.graph.zero_grad()
        elif self.kind != "engine":  # the engine zeroed them in its step
            self.optimizer.zero_grad()

    def release(self) -> None:
        if self.graph is not None:  # the graph's private memory pool goes with it
            self.graph.release()
