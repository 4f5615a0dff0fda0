"""One training process per run directory.

Two runs started in the same directory both write ``metrics.csv`` and ``checkpoints/``: the
second one's CSV logger rewrites the first one's file and their checkpoints interleave. The
first process to start takes an exclusive ``flock`` on ``<run dir>/.lock`` and holds it until
it exits (the kernel drops it when the process dies, even on ``kill -9``: a crashed run never
leaves a stale lock); a second one refuses in one line naming the holder.

Only the launching process (global rank 0) locks: the other ranks of the same run (Lightning's
DDP launcher re-runs the script, SLURM starts one task per rank) must not refuse.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path

from mamba_train.errors import MambaTrainError

_HELD: dict[Path, int] = {}  # run dir -> fd, for the life of the process


class RunLockedError(MambaTrainError, RuntimeError):
    """Another live process is training in this run directory."""


def launching_rank_zero() -> bool:
    """True in the process that launches the run (no rank set yet, or global rank 0)."""
    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK"):
        if os.environ.get(var, "0") not in ("", "0"):
            return False
    return True


def lock_run_dir(run_dir: Path) -> bool:
    """Take the run directory's lock for this process (idempotent); False on non-zero ranks."""
    run_dir = Path(run_dir).resolve()
    if run_dir in _HELD or not launching_rank_zero():
        return run_dir in _HELD
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / ".lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise RunLockedError(
            f"{run_dir} is in use by a running training ({holder}); wait for it to finish, stop "
            "it, or start this one with run_name=<another name>") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since "
                  f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
    _HELD[run_dir] = fd
    return True


def unlock_run_dir(run_dir: Path) -> None:
    """Release the lock early (tests running several runs in one process)."""
    fd = _HELD.pop(Path(run_dir).resolve(), None)
    if fd is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
