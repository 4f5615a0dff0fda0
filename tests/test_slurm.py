"""launch.sh on a real one-machine SLURM (tests/slurm/start_cluster.sh): 2 CPU ranks train under
srun; SIGUSR1 mid-run checkpoints, requeues and the rerun resumes from the saved step.

Skipped only when SLURM cannot be installed (not root, no apt-get); CI runs as root and has
slurm-wlm + munge installed by .ci/run (start_cluster.sh installs them too if missing).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SLURM = ROOT / "tests" / "slurm"
TINY = ["recipe=debug-mamba2", "model.d_model=64", "model.n_layer=2", "data.seq_len=64",
        "data.micro_batch_size=4", "data.num_workers=0", "trainer.log_every_n_steps=1",
        "callbacks.progress_bar=null", "trainer.enable_model_summary=false",
        "trainer.limit_val_batches=2", "train.val_every_n_steps=1000", "logger=csv",
        "train.checkpoint_every_n_steps=2"]


@pytest.fixture(scope="module")
def slurm_env():
    if not shutil.which("sbatch") and os.geteuid() != 0:
        pytest.skip("SLURM is not installed and cannot be installed without root")
    proc = subprocess.run(["bash", str(SLURM / "start_cluster.sh")], capture_output=True,
                          text=True, timeout=600)
    if proc.returncode == 3:
        pytest.skip(f"SLURM cannot be installed here: {proc.stderr.strip()[-500:]}")
    assert proc.returncode == 0, f"start_cluster.sh failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    cluster = proc.stdout.strip().splitlines()[-1]
    env = {**os.environ, "SLURM_CONF": f"{cluster}/slurm.conf"}
    for key in [k for k in env if k.startswith("SLURM_") and k != "SLURM_CONF"]:
        del env[key]  # never look like we are inside a job (launch.sh would run, not submit)
    for key in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK"):
        env.pop(key, None)  # a rendezvous another test left in this process is not the job's
    yield env
    subprocess.run(["bash", str(SLURM / "stop_cluster.sh"), cluster], timeout=120)


def submit(env, out: Path, *overrides: str) -> str:
    cmd = ["bash", str(ROOT / "launch.sh"), "--cpu", "--tasks-per-node", "2", "--time", "00:10:00",
           "--job-name", "mamba_test", "--output", str(out / "slurm-%j.out"),
           "--python", sys.executable, "--",
           *TINY, *overrides, f"paths.output_dir={out / 'outputs'}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()[-1]


def in_queue(env, job: str) -> bool:
    out = subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True, env=env)
    return bool(out.stdout.strip())


def wait_for(predicate, timeout: float, what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            tail = log.read_text()[-4000:] if log is not None and log.exists() else ""
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{tail}")
        time.sleep(0.2)


def job_info(env, job: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, env=env)
    return dict(re.findall(r"(\w+)=(\S+)", out.stdout))


def test_launch_sh_help_and_dry_run():
    help_ = subprocess.run(["bash", str(ROOT / "launch.sh"), "--help"], capture_output=True, text=True)
    assert help_.returncode == 0 and "--gpus-per-node" in help_.stdout and "SIGUSR1" in help_.stdout
    dry = subprocess.run(["bash", str(ROOT / "launch.sh"), "--dry-run", "-N", "2", "-g", "8",
                          "-p", "gpu", "-A", "proj", "-t", "48:00:00", "--", "recipe=mamba-370m"],
                         capture_output=True, text=True,
                         env={k: v for k, v in os.environ.items() if not k.startswith("SLURM_")})
    assert dry.returncode == 0, dry.stderr
    for flag in ("--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8", "--partition=gpu",
                 "--account=proj", "--time=48:00:00", "--signal=B:USR1@300", "--requeue",
                 "--open-mode=append", "recipe=mamba-370m"):
        assert flag in dry.stdout, (flag, dry.stdout)
    refused = subprocess.run(["bash", str(ROOT / "launch.sh"), "--dry-run", "ckpt_path=x"],
                             capture_output=True, text=True)
    assert refused.returncode == 2 and "ckpt_path=last" in refused.stderr


def test_two_ranks_train_under_slurm(slurm_env, tmp_path):
    job = submit(slurm_env, tmp_path, "train.global_batch_tokens=512", "trainer.max_steps=4")
    log = tmp_path / f"slurm-{job}.out"
    wait_for(lambda: not in_queue(slurm_env, job), 240, f"job {job}", log)
    info = job_info(slurm_env, job)
    assert info.get("JobState") == "COMPLETED", (info, log.read_text()[-4000:])
    text = log.read_text()
    assert f"launch.sh: job {job} restart 0 | 1 node(s) x 2 rank(s) (cpu)" in text
    run = tmp_path / "outputs" / "debug-mamba2"
    for rank in (0, 1):  # every rank is a separate srun task with its own log
        rank_log = (run / f"rank{rank}.log").read_text()
        assert f"SSM init check passed for 2 mixers on rank {rank}" in rank_log
        assert f"training starts at step 0 (rank {rank}, SLURM_RESTART_COUNT=0, SLURM_JOB_ID={job})" in rank_log
    assert "All distributed processes registered. Starting with 2 processes" in text
    # srun --label: rank 0 speaks for the job on the console; rank 1 only into its own log
    assert re.search(r"^0: .*training starts", text, re.M)
    assert not re.search(r"^1: .*(training starts|SSM init check|step )", text, re.M), text[-4000:]
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 4
    assert json.loads((run / "summary.json").read_text())["steps"] == 4


def test_sigusr1_checkpoints_requeues_and_resumes(slurm_env, tmp_path):
    max_steps = 40
    # 2048 tokens/step = 2 ranks x accumulation 4 x (4 x 64): slow enough to signal mid-run
    job = submit(slurm_env, tmp_path, "train.global_batch_tokens=2048", f"trainer.max_steps={max_steps}")
    log = tmp_path / f"slurm-{job}.out"
    run = tmp_path / "outputs" / "debug-mamba2"
    wait_for(lambda: (run / "checkpoints" / "step0000002.ckpt").exists(), 180, "step 2", log)
    # what SLURM does S seconds before --time with --signal=B:USR1@S
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=slurm_env, check=True)
    wait_for(lambda: not in_queue(slurm_env, job), 300, f"job {job} to requeue and finish", log)

    info = job_info(slurm_env, job)
    text = log.read_text()  # --open-mode=append: both runs
    assert info.get("JobState") == "COMPLETED" and info.get("Restarts") == "1", (info, text[-4000:])
    assert f"launch.sh: job {job} restart 0 " in text and f"launch.sh: job {job} restart 1 " in text
    rank0 = (run / "rank0.log").read_text()
    saved = re.search(r"preemption signal \(SIGUSR1\): saved step (\d+) to (\S+); stopping and requeueing", rank0)
    assert saved, rank0[-4000:]
    step = int(saved.group(1))
    assert 2 <= step < max_steps
    assert saved.group(2) == str(run / "checkpoints" / "last.ckpt")
    assert f"requeued SLURM job {job}; it resumes from step {step}" in rank0
    for rank in (0, 1):  # both ranks resumed from the saved step, not from 0
        rank_log = (run / f"rank{rank}.log").read_text()
        assert f"training starts at step {step} (rank {rank}, SLURM_RESTART_COUNT=1" in rank_log
    assert f"Restoring states from the checkpoint path at {run / 'checkpoints' / 'last.ckpt'}" in text
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == max_steps
    assert json.loads((run / "summary.json").read_text())["steps"] == max_steps


def test_submitit_sweep_launcher_config_composes():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    proc = subprocess.run([sys.executable, "-m", "mamba_train", "hydra/launcher=slurm", "recipe=debug",
                           "hydra.launcher.partition=gpu", "--cfg", "hydra", "-p", "hydra.launcher"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher" in proc.stdout
    assert "partition: gpu" in proc.stdout and "requeue: true" in proc.stdout
