"""One training process per run directory, and the run directory is the run's own.

Two runs started in the same directory both write ``metrics.csv`` and ``checkpoints/``: the
second one's CSV logger rewrites the first one's file and their checkpoints interleave. The
first process to start takes an exclusive ``flock`` on ``<run dir>/.lock`` and holds it until
it exits (the kernel drops it when the process dies, even on ``kill -9``: a crashed run never
leaves a stale lock); a second one refuses in one line naming the holder.

Before taking it, the directory is checked (``claim_run_dir``):

* a directory that holds files but was never a run's (no ``.lock``, no checkpoint, no resolved
  config) is refused: a run would prune its ``metrics/metrics.csv`` and replace its
  ``summary.json`` and ``loss.png`` (``prepare`` refuses a foreign ``out=`` the same way);
* a file the run writes that is a symbolic link is refused (a link planted there would make the
  run write to its target); the log file Hydra opened is closed first, unwritten;
* the log handlers writing into the directory report a failed write (a full disk) once and
  stop, instead of printing a traceback for every record while the run goes on.

Only the launching process (global rank 0) locks: the other ranks of the same run (Lightning's
DDP launcher re-runs the script, SLURM starts one task per rank) must not refuse.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import sys
import time
from pathlib import Path

from mamba_train.errors import MambaTrainError
from mamba_train.fileio import exclusive_lock, refuse_symlinks, release_lock

_HELD: dict[Path, int] = {}  # run dir -> fd, for the life of the process
LOCK_FILE = ".lock"
# what a run writes at the top of its directory (the log: whatever FileHandler points there)
RUN_FILES = (LOCK_FILE, "summary.json", "loss.png", "wandb_run_id", "config.resolved.yaml",
             "metrics/metrics.csv", "metrics/hparams.yaml")
# present in a fresh run directory before the run starts: Hydra's config copies and job log
_BEFORE_START = (".hydra",)
# the other ranks' Hydra logs (launch.sh names each rank's job ``rank<N>``): they may start
# writing before rank 0 claims the directory
_RANK_LOG = re.compile(r"rank\d+\.log")


class RunLockedError(MambaTrainError, RuntimeError):
    """Another live process is training in this run directory."""


class ForeignRunDirError(MambaTrainError, RuntimeError):
    """The run directory exists and holds files that are not a mamba_train run's."""


def launching_rank_zero() -> bool:
    """True in the process that launches the run (no rank set yet, or global rank 0)."""
    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK"):
        if os.environ.get(var, "0") not in ("", "0"):
            return False
    return True


def _file_handlers(run_dir: Path) -> list[tuple[logging.Logger, logging.FileHandler]]:
    loggers = [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values()
                                       if isinstance(lg, logging.Logger)]
    return [(lg, h) for lg in loggers for h in lg.handlers if isinstance(h, logging.FileHandler)
            and Path(h.baseFilename).parent.resolve() == run_dir]


def _is_run_dir(run_dir: Path) -> bool:
    ckpts = run_dir / "checkpoints"
    return ((run_dir / LOCK_FILE).exists() or (run_dir / "config.resolved.yaml").is_file()
            or (ckpts.is_dir() and any(p.suffix == ".ckpt" for p in ckpts.iterdir())))


def _check_ours(run_dir: Path, logs: set[str]) -> None:
    if _is_run_dir(run_dir):
        return
    foreign = sorted(p.name for p in run_dir.iterdir()
                     if p.name not in _BEFORE_START and p.name not in logs
                     and not _RANK_LOG.fullmatch(p.name))
    if foreign:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise ForeignRunDirError(
            f"run_dir={run_dir} already exists and is not a mamba_train run directory (it holds "
            f"{shown}); a run there would overwrite metrics/metrics.csv, summary.json and "
            "loss.png: choose another run_dir (or run_name), or empty it")


def _report_once(handler: logging.FileHandler, loggers: list[logging.Logger]) -> None:
    """A failed write of the log (a full disk) is said once; the handler then stops."""
    def handle_error(record: logging.LogRecord) -> None:
        for lg in loggers:
            lg.removeHandler(handler)
        err = sys.exc_info()[1]
        print(f"warning: cannot write the log {handler.baseFilename} ({err}); the run goes on, "
              "logging to the console only", file=sys.stderr, flush=True)
    handler.handleError = handle_error


def claim_run_dir(run_dir: Path) -> None:
    """The checks above, then nothing else: call before the run writes into ``run_dir``."""
    handlers = _file_handlers(run_dir)
    linked = [(lg, h) for lg, h in handlers if os.path.islink(h.baseFilename)]
    for lg, h in linked:  # opened by Hydra through the link: close it before anything is logged
        lg.removeHandler(h)
        h.close()
    refuse_symlinks(*(h.baseFilename for _, h in linked))
    _check_ours(run_dir, {Path(h.baseFilename).name for _, h in handlers})
    refuse_symlinks(*(run_dir / f for f in RUN_FILES))
    for _, h in handlers:
        _report_once(h, [lg for lg, other in handlers if other is h])


def lock_run_dir(run_dir: Path) -> bool:
    """Claim and lock the run directory for this process (idempotent); False on non-zero ranks."""
    run_dir = Path(run_dir).resolve()
    if run_dir in _HELD or not launching_rank_zero():
        return run_dir in _HELD
    run_dir.mkdir(parents=True, exist_ok=True)
    claim_run_dir(run_dir)
    fd, holder = exclusive_lock(run_dir / LOCK_FILE, f"pid {os.getpid()} on {socket.gethostname()} "
                                f"since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    if fd is None:
        raise RunLockedError(
            f"{run_dir} is in use by a running training ({holder}); wait for it to finish, stop "
            "it, or start this one with run_name=<another name>")
    _HELD[run_dir] = fd
    return True


def unlock_run_dir(run_dir: Path) -> None:
    """Release the lock early (tests running several runs in one process)."""
    fd = _HELD.pop(Path(run_dir).resolve(), None)
    if fd is not None:
        release_lock(fd)


def check_hydra_run_dir(config) -> None:
    """What Hydra itself would trip over while creating the run directory, before the run's
    code starts, as one line: the directory's name unresolvable (an unset ``${oc.env:...}``),
    a name longer than the filesystem allows (a long ``run_name``), ``.hydra`` that is a file,
    and symbolic links where Hydra writes (``.hydra/*.yaml``, the log)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import InterpolationResolutionError

    from mamba_train.models.config import ConfigError

    try:
        run_dir = Path(str(OmegaConf.select(config, "hydra.run.dir"))).expanduser()
    except InterpolationResolutionError as e:
        cause = str(getattr(e, "msg", e)).strip().splitlines()[0]
        raise ConfigError(f"the run directory cannot be resolved ({cause.split(': ', 1)[-1].strip(chr(34))}); set "
                          "the variable, or give run_dir=<dir>") from None
    existing = next(p for p in [*run_dir.parents, Path("/")] if _exists(p))
    limit = os.pathconf(existing, "PC_NAME_MAX") if hasattr(os, "pathconf") else 255
    for part in run_dir.parts:
        if len(part.encode()) > limit:
            raise ConfigError(f"the run directory's name {part[:40]!r}... is {len(part)} "
                              f"characters, more than the {limit} a file name may have in "
                              f"{existing}; use a shorter run_name (or run_dir)")
    try:  # Hydra creates it next: a parent that is a file, or a read-only place, said here
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create the run directory {run_dir}: {e.strerror} ({e.filename}); "
                          "set paths.output_dir (or run_dir) to a writable directory") from None
    hydra_dir = run_dir / ".hydra"
    refuse_symlinks(hydra_dir, *(hydra_dir / f"{n}.yaml" for n in ("config", "hydra", "overrides")),
                    run_dir / f"{OmegaConf.select(config, 'hydra.job.name')}.log")
    if hydra_dir.exists() and not hydra_dir.is_dir():
        raise ForeignRunDirError(f"{hydra_dir} is a file; Hydra keeps the run's config copies in "
                                 "that directory: move the file away or use another run_dir")


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # e.g. a name too long to look up
        return False


def _hydra_callback_base():
    try:
        from hydra.experimental.callback import Callback
    except ImportError:  # Hydra < 1.1
        return object
    return Callback


class RunDirPreflight(_hydra_callback_base()):
    """Hydra callback (``hydra.callbacks``): :func:`check_hydra_run_dir` before Hydra creates the
    run directory; a refusal is one ``error:`` line and exit status 2, like the run's own."""

    def on_run_start(self, config, **kwargs) -> None:
        try:
            check_hydra_run_dir(config)
        except MambaTrainError as e:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(2)
