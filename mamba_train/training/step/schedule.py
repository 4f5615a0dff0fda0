"""Learning-rate schedules, as picklable ``LambdaLR`` multipliers stepped per optimizer step.

* ``warmup_cosine``: linear warm-up, then cosine decay to an absolute floor (Mamba papers:
  warm-up then cosine to 1e-5).
* ``wsd``: warm-up, stable, decay (Hu et al. 2024, MiniCPM; Hägele et al. 2024, "Scaling Laws
  and Compute-Optimal Training Beyond Fixed Training Durations"): the peak LR holds until the
  last ``decay_fraction`` of the steps, which decay linearly, by a half cosine, or by
  ``1-sqrt`` (the shape Hägele et al. found best) to ``min_lr``. The usual schedule for
  continued pretraining: the stable phase can be extended and branched without knowing the
  final length in advance.

Both warm up linearly from ``warmup_start_lr`` (absolute; 0 = from scratch). A continued run
re-warms from a chosen LR, e.g. the LR the source model ended its own schedule with. Step 0
trains one warm-up increment above the start (so a start of 0 never trains a step at LR 0);
step ``warmup_steps - 1`` trains at the peak.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mamba_train.errors import MambaTrainError

DECAY_SHAPES = ("linear", "cosine", "1-sqrt")


class ScheduleError(MambaTrainError, ValueError):
    """A schedule setting that cannot describe a run of this length; names the scheduler key."""


def _warmup(step: int, warmup_steps: int, start: float) -> float:
    """Multiplier during warm-up: from ``start`` (a fraction of the peak) up to 1."""
    return start + (1 - start) * (step + 1) / warmup_steps


@dataclass
class WarmupCosine:
    """lr(step) / peak_lr. ``min_lr`` and ``start_lr`` are absolute (1e-5 in the papers), not ratios."""

    peak_lr: float
    warmup_steps: int
    total_steps: int
    min_lr: float = 1e-5
    start_lr: float = 0.0

    def __post_init__(self) -> None:
        if self.total_steps <= 0:
            raise ScheduleError(f"the LR schedule needs trainer.max_steps > 0, got {self.total_steps}")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ScheduleError(
                f"scheduler.warmup_steps={self.warmup_steps} (set, or warmup_fraction x steps) must "
                f"be in [0, trainer.max_steps={self.total_steps}]; lower it or train longer")
        if not 0 <= self.min_lr <= self.peak_lr:
            raise ScheduleError(f"scheduler.min_lr={self.min_lr} must be in [0, optim.lr="
                                f"{self.peak_lr}]")
        if not 0 <= self.start_lr <= self.peak_lr:
            raise ScheduleError(f"scheduler.warmup_start_lr={self.start_lr} must be in [0, optim.lr="
                                f"{self.peak_lr}]")

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return _warmup(step, self.warmup_steps, self.start_lr / self.peak_lr)
        floor = self.min_lr / self.peak_lr
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class WarmupStableDecay(WarmupCosine):
    """Warm-up, peak until ``total_steps - decay_steps``, then ``decay_shape`` down to ``min_lr``,
    reached at the last step (``total_steps - 1``)."""

    decay_steps: int = 0
    decay_shape: str = "1-sqrt"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.decay_shape not in DECAY_SHAPES:
            raise ScheduleError(f"scheduler.decay_shape must be one of {DECAY_SHAPES}, got "
                                f"{self.decay_shape!r}")
        if not 0 <= self.decay_steps <= self.total_steps - self.warmup_steps:
            raise ScheduleError(f"scheduler.decay_steps={self.decay_steps} (set, or decay_fraction x "
                                f"steps) must be in [0, trainer.max_steps - warmup steps = "
                                f"{self.total_steps - self.warmup_steps}]")

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return _warmup(step, self.warmup_steps, self.start_lr / self.peak_lr)
        decay_start = self.total_steps - self.decay_steps
        if step < decay_start or self.decay_steps == 0:
            return 1.0
        progress = min(1.0, (step - decay_start + 1) / self.decay_steps)
        if self.decay_shape == "linear":
            shape = 1 - progress
        elif self.decay_shape == "cosine":
            shape = 0.5 * (1 + math.cos(math.pi * progress))
        else:
            shape = 1 - math.sqrt(progress)
        floor = self.min_lr / self.peak_lr
        return floor + (1 - floor) * shape


def _steps(total: int, fraction: float, steps: int | None, name: str) -> int:
    """``steps`` if set, else ``fraction`` of ``total``; the fraction must be one."""
    if steps is not None:
        return int(steps)
    if not 0 <= fraction <= 1:
        raise ScheduleError(f"scheduler.{name}_fraction={fraction} must be in [0, 1] (a share of "
                            f"the run's steps); or set scheduler.{name}_steps")
    return int(round(fraction * total))


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_fraction: float = 0.1,
                  warmup_steps: int | None = None, min_lr: float = 1e-5,
                  warmup_start_lr: float = 0.0):
    """A ``LambdaLR`` for Lightning (``interval: step``). Peak = the optimizer's ``lr``."""
    peak = optimizer.param_groups[0]["lr"]
    warmup = _steps(total_steps, warmup_fraction, warmup_steps, "warmup")
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, WarmupCosine(peak, warmup, total_steps, min(min_lr, peak), warmup_start_lr)
    )


def wsd(optimizer: torch.optim.Optimizer, total_steps: int, warmup_fraction: float = 0.01,
        warmup_steps: int | None = None, warmup_start_lr: float = 0.0,
        decay_fraction: float = 0.2, decay_steps: int | None = None,
        decay_shape: str = "1-sqrt", min_lr: float = 0.0):
    """Warm-up / stable / decay ``LambdaLR``; the peak is the optimizer's ``lr``."""
    peak = optimizer.param_groups[0]["lr"]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupStableDecay(
        peak, _steps(total_steps, warmup_fraction, warmup_steps, "warmup"), total_steps,
        min(min_lr, peak), warmup_start_lr,
        decay_steps=_steps(total_steps, decay_fraction, decay_steps, "decay"),
        decay_shape=decay_shape))
