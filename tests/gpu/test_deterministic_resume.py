"""Deterministic mode on the GPU: a run resumed from its step-N/2 checkpoint reproduces the
uninterrupted run's loss trajectory bit for bit (mamba2-130m shape, fused kernels)."""

from pathlib import Path

from conftest import compose_config, metric_by_step
from mamba_train.train import train

STEPS = 24


def _config(out: Path, run_name: str, *extra: str):
    overrides = [
        "recipe=mamba2-130m", "data=default", "model.vocab_size=4096", "backend=fused",
        "data.seq_len=1024", "data.micro_batch_size=4", "train.global_batch_tokens=8192",
        f"trainer.max_steps={STEPS}", "trainer.deterministic=true", "trainer.log_every_n_steps=1",
        "trainer.limit_val_batches=0", "train.val_every_n_steps=100000",
        f"train.checkpoint_every_n_steps={STEPS // 2}", "train.keep_last_k_checkpoints=-1",
        "logger=csv", f"run_name={run_name}", *extra,
    ]
    return compose_config(overrides, out)


def _losses(run_dir: Path) -> dict[int, float]:
    return metric_by_step(run_dir, "train/loss")


def test_deterministic_resume_is_bit_exact(tmp_path, record):
    straight = train(_config(tmp_path, "straight"))
    mid = straight["run_dir"] / "checkpoints" / f"step{STEPS // 2:07d}.ckpt"
    resumed = train(_config(tmp_path, "resumed", f"ckpt_path={mid}"))
    a, b = _losses(straight["run_dir"]), _losses(resumed["run_dir"])
    steps = sorted(b)
    mismatches = [s for s in steps if a[s] != b[s]]
    record(f"deterministic resume mamba2-130m fused: steps {steps[0]}..{steps[-1]} compared, "
           f"{len(mismatches)} mismatches; loss at step {steps[-1]}: straight {a[steps[-1]]!r} "
           f"resumed {b[steps[-1]]!r}")
    assert steps == list(range(STEPS // 2 + 1, STEPS + 1))  # the steps after the checkpoint
    assert not mismatches
