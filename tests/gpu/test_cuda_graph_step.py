"""The captured training step (``trainer.cuda_graph=on``) trains like the eager one for 24
optimizer steps, for Mamba and Mamba-2, with gradient accumulation 2 and validation inside the
run. All runs use the deterministic mode (MAMBA_DETERMINISTIC): run this file in a process of
its own (tests/gpu/run_all.sh does), since the kernels read the flag when they are imported.

The tolerance is measured, not guessed: a second eager run gives the kernels' own run-to-run
difference. Mamba-2's kernels are deterministic there (two eager runs agree bit for bit), so the
captured run must agree bit for bit too. Mamba-1's CUDA scan and causal-conv1d backward
accumulate with atomics even in that mode, so its captured run must stay within the band of two
eager runs."""

import csv
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module

from mamba_train.train import train

STEPS = 24


def _config(out: Path, recipe: str, mode: str, suffix: str = ""):
    overrides = [
        f"recipe={recipe}", "model.n_layer=4", "data=default", "model.vocab_size=4096",
        "backend=fused", "data.seq_len=1024", "data.micro_batch_size=4",
        "train.global_batch_tokens=8192",  # accumulation 2
        f"trainer.max_steps={STEPS}", "trainer.deterministic=true", f"trainer.cuda_graph={mode}",
        "trainer.log_every_n_steps=1", "trainer.limit_val_batches=2", "train.val_every_n_steps=8",
        "train.checkpoint_every_n_steps=100000", "logger=csv", f"paths.output_dir={out}",
        f"run_name={recipe}-{mode}{suffix}",
    ]
    with initialize_config_module(config_module="mamba_train.conf", version_base="1.3"):
        return compose("config", overrides=overrides)


def _losses(run_dir: Path) -> dict[int, float]:
    with open(run_dir / "metrics" / "metrics.csv") as f:
        return {int(r["step"]): float(r["train/global_loss"]) for r in csv.DictReader(f)
                if r.get("train/global_loss")}


@pytest.mark.parametrize("recipe", ["mamba2-130m", "mamba-130m"])
def test_captured_step_matches_eager(recipe, tmp_path, record):
    eager = train(_config(tmp_path, recipe, "off"))
    eager_again = train(_config(tmp_path, recipe, "off", "-again"))
    graphed = train(_config(tmp_path, recipe, "on"))
    step = graphed["module"].graph_step
    assert step is not None and step.captured, "the step was not captured"
    a, a2, b = (_losses(r["run_dir"]) for r in (eager, eager_again, graphed))
    assert sorted(a) == sorted(a2) == sorted(b) == list(range(STEPS))
    noise = max(abs(a[s] - a2[s]) for s in a)
    diff = max(abs(a[s] - b[s]) for s in a)
    wdiff = _max_weight_diff(eager, graphed)
    record(f"cuda_graph {recipe} (4 layers, 4x1024, accumulation 2, deterministic): {STEPS} steps, "
           f"max |loss eager - captured| {diff:.3g} (eager - eager {noise:.3g}), max |weight "
           f"diff| {wdiff:.3g}, final loss eager {a[STEPS - 1]!r} captured {b[STEPS - 1]!r}")
    if noise == 0.0:  # deterministic kernels: the graph must not change a single bit
        assert diff == 0.0 and wdiff == 0.0
    else:
        assert recipe.startswith("mamba-"), "Mamba-2 kernels should be deterministic here"
        assert diff <= 3 * noise, (diff, noise)
        mean = lambda losses: sum(losses[s] for s in range(STEPS - 8, STEPS)) / 8  # noqa: E731
        assert abs(mean(a) - mean(b)) <= 3 * abs(mean(a) - mean(a2)) + 1e-3


def _max_weight_diff(x: dict, y: dict) -> float:
    px, py = x["module"].model.state_dict(), y["module"].model.state_dict()
    return max((px[k].float() - py[k].float()).abs().max().item() for k in px)
