"""Fault injection for the CLI: run ``python -m mamba_train`` (through ``fault_cli.py``) as a
subprocess, wait for step N or a checkpoint write, kill or signal it, damage files."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

RUNNER = Path(__file__).with_name("fault_cli.py")
REPO = Path(__file__).parents[2]
# a ~0.15M-parameter Mamba-1 (plus the 4096-token embedding): a step takes milliseconds
TINY_CLI = ["recipe=debug", "model.d_model=32", "model.n_layer=1", "data.seq_len=32",
            "data.micro_batch_size=2", "train.global_batch_tokens=64", "data.num_workers=0",
            "trainer.limit_val_batches=1", "train.val_every_n_steps=1000",
            "callbacks.progress_bar=null", "trainer.enable_model_summary=false", "logger=csv",
            "trainer.log_every_n_steps=1"]


def _env(faults: dict[str, object] | None) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HYDRA_FULL_ERROR": "0", "WANDB_MODE": "offline"}
    for k in [k for k in env if k.startswith("MT_FAULT_")]:
        del env[k]
    env.update({f"MT_FAULT_{k.upper()}": str(v) for k, v in (faults or {}).items()})
    return env


def start(out: Path, *overrides: str, faults: dict | None = None) -> subprocess.Popen:
    """The CLI on the tiny debug model in ``out`` (``paths.output_dir``), running."""
    cmd = [sys.executable, str(RUNNER), *TINY_CLI, *overrides, f"paths.output_dir={out}"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env(faults), cwd=REPO)


def run(out: Path, *overrides: str, faults: dict | None = None,
        timeout: float = 300) -> subprocess.CompletedProcess:
    proc = start(out, *overrides, faults=faults)
    stdout, stderr = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def finish(proc: subprocess.Popen, timeout: float = 120) -> subprocess.CompletedProcess:
    stdout, stderr = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def rows(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics" / "metrics.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def losses(run_dir: Path) -> list[tuple[int, str]]:
    """(step, train/loss as written) in file order: duplicates and gaps stay visible."""
    return [(int(float(r["step"])), r["train/loss"]) for r in rows(run_dir) if r.get("train/loss")]


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 120, what: str = "") -> None:
    t0 = time.time()
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {proc.returncode}) before {what}: "
                                 f"{proc.stderr.read()[-3000:] if proc.stderr else ''}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = 120) -> None:
    """Until the row of ``step`` is in metrics.csv (rows are written as they are logged)."""
    def logged():
        try:
            return any(s >= step for s, _ in losses(run_dir))
        except (ValueError, KeyError):  # a row being written
            return False
    wait_for(logged, proc, timeout, f"step {step}")


def partials(ckpt_dir: Path) -> list[Path]:
    return sorted(Path(ckpt_dir).glob(".*.ckpt.*tmp*"))


def kill(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    proc.send_signal(sig)


def truncate(path: Path, keep_fraction: float = 0.5) -> None:
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: int(len(data) * keep_fraction)])


def scramble(path: Path, seed: int = 0) -> None:
    """Overwrite the file with random bytes of the same length."""
    g = torch.Generator().manual_seed(seed)
    n = Path(path).stat().st_size
    Path(path).write_bytes(bytes(torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8).tolist()))


def global_step(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=False)["global_step"])


def loads(path: Path) -> bool:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception:  # noqa: BLE001
        return False
    return isinstance(ckpt, dict) and "state_dict" in ckpt
