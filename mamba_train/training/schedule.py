"""Learning-rate schedule: linear warm-up, then cosine decay to an absolute floor (Mamba papers:
warm-up then cosine to 1e-5). A picklable ``LambdaLR`` multiplier, stepped per optimizer step."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class WarmupCosine:
    """lr(step) / peak_lr. ``min_lr`` is absolute (1e-5 in the papers), not a ratio."""

    peak_lr: float
    warmup_steps: int
    total_steps: int
    min_lr: float = 1e-5

    def __post_init__(self) -> None:
        if self.total_steps <= 0:
            raise ValueError(f"scheduler total_steps must be > 0, got {self.total_steps}")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(
                f"scheduler warmup_steps={self.warmup_steps} must be in [0, total_steps={self.total_steps}]"
            )
        if self.min_lr > self.peak_lr:
            raise ValueError(f"scheduler min_lr={self.min_lr} exceeds the peak lr {self.peak_lr}")

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        floor = self.min_lr / self.peak_lr
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_fraction: float = 0.1,
                  warmup_steps: int | None = None, min_lr: float = 1e-5):
    """A ``LambdaLR`` for Lightning (``interval: step``). Peak = the optimizer's ``lr``."""
    peak = optimizer.param_groups[0]["lr"]
    warmup = int(round(warmup_fraction * total_steps)) if warmup_steps is None else warmup_steps
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, WarmupCosine(peak, warmup, total_steps, min(min_lr, peak))
    )
