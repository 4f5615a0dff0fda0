"""LR schedules (training/step/schedule.py): the warm-up / stable / decay shape of ``scheduler=wsd``,
the re-warm-up from a chosen LR, and the config group wiring."""

from __future__ import annotations

import math

import pytest
import torch
from hydra.utils import instantiate

from conftest import compose_config
from mamba_train.training.step.schedule import WarmupCosine, WarmupStableDecay, warmup_cosine, wsd


def lrs(scheduler, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        out.append(scheduler.get_last_lr()[0])
        scheduler.optimizer.step()
        scheduler.step()
    return out


def optimizer(lr: float):
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


@pytest.mark.parametrize("shape", ["linear", "cosine", "1-sqrt"])
def test_wsd_shape(shape):
    peak, floor, total = 1e-3, 1e-5, 100
    got = lrs(wsd(optimizer(peak), total, warmup_steps=10, decay_fraction=0.2, decay_shape=shape,
                  min_lr=floor, warmup_start_lr=1e-4), total)
    # warm-up: linear from the chosen start, peak at step 9
    assert got[0] == pytest.approx(1e-4 + (peak - 1e-4) / 10)
    assert got[9] == pytest.approx(peak)
    assert all(b > a for a, b in zip(got[:10], got[1:10]))
    # stable: exactly the peak until the last 20 steps
    assert all(v == pytest.approx(peak) for v in got[9:80])
    # decay: strictly down to min_lr at the last step, with the shape's midpoint
    decay = got[80:]
    assert all(b < a for a, b in zip([peak, *decay], decay))
    assert decay[-1] == pytest.approx(floor)
    mid = {"linear": 0.5, "cosine": 0.5, "1-sqrt": 1 - math.sqrt(0.5)}[shape]
    assert got[89] == pytest.approx(floor + (peak - floor) * mid)


def test_shapes_differ_where_they_should():
    total = 50
    curves = {s: lrs(wsd(optimizer(1.0), total, warmup_steps=0, decay_steps=20, decay_shape=s), total)
              for s in ("linear", "cosine", "1-sqrt")}
    q = 30 + 4  # a quarter into the decay: cosine above linear above 1-sqrt
    assert curves["cosine"][q] > curves["linear"][q] > curves["1-sqrt"][q]
    assert curves["linear"][:30] == [1.0] * 30


def test_rewarmup_of_warmup_cosine():
    got = lrs(warmup_cosine(optimizer(1e-3), 100, warmup_steps=4, warmup_start_lr=2e-4), 5)
    assert got[:4] == pytest.approx([4e-4, 6e-4, 8e-4, 1e-3])
    assert WarmupCosine(1.0, 4, 10)(0) == 0.25  # the default start: 0, as before


def test_wsd_refuses_bad_settings():
    with pytest.raises(ValueError, match="decay_shape"):
        WarmupStableDecay(1.0, 0, 10, decay_steps=2, decay_shape="exp")
    with pytest.raises(ValueError, match="decay_steps=20"):
        WarmupStableDecay(1.0, 0, 10, decay_steps=20)
    with pytest.raises(ValueError, match="warmup_start_lr"):
        WarmupStableDecay(1.0, 2, 10, start_lr=2.0)
    assert WarmupStableDecay(1.0, 0, 10, decay_steps=0)(15) == 1.0  # no decay: flat


def test_scheduler_group_composes(tmp_path):
    cfg = compose_config(["scheduler=wsd", "scheduler.decay_shape=cosine",
                          "scheduler.warmup_start_lr=1e-5"], tmp_path)
    sched = instantiate(cfg.scheduler)(optimizer(1e-3), total_steps=1000)
    fn = sched.lr_lambdas[0]
    assert isinstance(fn, WarmupStableDecay)
    assert (fn.warmup_steps, fn.decay_steps, fn.decay_shape, fn.start_lr) == (10, 200, "cosine", 1e-5)


def test_constant_scheduler_trains_at_the_optimizer_lr(make_config):
    """scheduler=constant (a null group) reaches the module as an empty node: no schedule."""
    from mamba_train.train import train

    result = train(make_config("scheduler=constant", "trainer.max_steps=2", "optim.lr=1e-3",
                               "trainer.accelerator=cpu", "logger=csv"))
    optimizer = result["trainer"].optimizers[0]
    assert result["trainer"].lr_scheduler_configs == []
    assert optimizer.param_groups[0]["lr"] == 1e-3
