"""The captured training step (``trainer.cuda_graph=on``) trains exactly like the eager one:
same loss trajectory for 24 optimizer steps and the same final weights, for Mamba and Mamba-2,
with gradient accumulation 2 and validation inside the run. Both runs use the deterministic
mode (MAMBA_DETERMINISTIC), so the comparison is bit for bit: run this file in a process of its
own (tests/gpu/run_all.sh does), since the kernels read the flag when they are imported."""

import csv
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module

from mamba_train.train import train

STEPS = 24


def _config(out: Path, recipe: str, mode: str):
    overrides = [
        f"recipe={recipe}", "model.n_layer=4", "data=default", "model.vocab_size=4096",
        "backend=fused", "data.seq_len=1024", "data.micro_batch_size=4",
        "train.global_batch_tokens=8192",  # accumulation 2
        f"trainer.max_steps={STEPS}", "trainer.deterministic=true", f"trainer.cuda_graph={mode}",
        "trainer.log_every_n_steps=1", "trainer.limit_val_batches=2", "train.val_every_n_steps=8",
        "train.checkpoint_every_n_steps=100000", "logger=csv", f"paths.output_dir={out}",
        f"run_name={recipe}-{mode}",
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
    graphed = train(_config(tmp_path, recipe, "on"))
    step = graphed["module"].graph_step
    assert step is not None and step.captured, "the step was not captured"
    a, b = _losses(eager["run_dir"]), _losses(graphed["run_dir"])
    assert sorted(a) == sorted(b) == list(range(STEPS))
    diff = max(abs(a[s] - b[s]) for s in a)
    pa, pb = eager["module"].model.state_dict(), graphed["module"].model.state_dict()
    wdiff = max((pa[k].float() - pb[k].float()).abs().max().item() for k in pa)
    record(f"cuda_graph {recipe} (4 layers, 4x1024, accumulation 2, deterministic): {STEPS} steps, "
           f"max |loss eager - captured| {diff:.3g}, max |weight diff| {wdiff:.3g}, "
           f"final loss eager {a[STEPS - 1]!r} captured {b[STEPS - 1]!r}")
    assert diff == 0.0 and wdiff == 0.0
    assert torch.isfinite(torch.tensor(b[STEPS - 1]))
