"""Which checkpoint a run resumes from, decided by mamba_train rather than Lightning.

Lightning's ``ckpt_path="last"`` looks only for ``last.ckpt``: when that file is missing it
warns and trains from step 0 over the existing run (duplicating its metrics, writing ``-v1``
files), and when it is truncated it fails with a deep unpickling traceback. Here ``last`` means
*the newest checkpoint of this run that loads*: every ``*.ckpt`` under ``<run dir>/checkpoints``
is opened (memory-mapped: the tensors are not read), unreadable ones are named and skipped, and
if checkpoints exist but none loads the run refuses instead of starting over.

``clean_checkpoint_dir`` removes what an interrupted run leaves behind: partial
``.<name>.ckpt.<random>.tmp`` files of the atomic writer and step files beyond ``keep_last_k``
that no run tracks any more (a run killed between saving a new step file and rotating the
oldest one out leaves one more each time).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from mamba_train.errors import MambaTrainError

log = logging.getLogger(__name__)

STEP_FILE = re.compile(r"^step(\d+)(-v\d+)?\.ckpt$")
# partial writes: fileio.atomic_write's ".<name>.<random>.tmp", older ".<name>.tmp-<pid>"
PARTIAL_FILE = re.compile(r"^\..+\.ckpt\.(.+\.tmp|tmp-\d+)$")


class ResumeError(MambaTrainError, RuntimeError):
    """No checkpoint to resume from where one is needed; the message says what to do."""


@dataclass(frozen=True)
class Candidate:
    path: Path
    global_step: int | None  # None: unreadable
    problem: str = ""


def inspect_checkpoint(path: Path) -> Candidate:
    """Open a checkpoint cheaply (memory-mapped, weights not read) and check its shape.

    A sharded checkpoint (a directory, written by FSDP or DeepSpeed) cannot be opened without
    the strategy, so it is accepted when it is a non-empty directory; among directories the
    most recently written one is taken."""
    if path.is_dir():
        if not any(path.iterdir()):
            return Candidate(path, None, "empty sharded-checkpoint directory")
        match = STEP_FILE.match(path.name)
        return Candidate(path, int(match.group(1)) if match else -1)
    try:
        if path.stat().st_size == 0:
            return Candidate(path, None, "empty file")
        ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # noqa: BLE001 -- any failure to open means "not loadable"
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return Candidate(path, None, f"unreadable ({type(e).__name__}: {first[:160]})")
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "global_step" not in ckpt:
        return Candidate(path, None, "not a Lightning training checkpoint (no state_dict/global_step)")
    return Candidate(path, int(ckpt["global_step"]))


def _mtime(path: Path) -> float:
    """Last write; for a sharded checkpoint (a directory) that of its newest file."""
    try:  # other ranks may be cleaning the directory meanwhile (SLURM starts them together)
        if path.is_dir():
            return max((f.stat().st_mtime for f in path.rglob("*") if f.is_file()), default=0.0)
        return path.stat().st_mtime
    except OSError:
        return 0.0


def checkpoint_files(ckpt_dir: Path) -> list[Path]:
    """The checkpoints of a run directory (partial writes are dot-files and never count)."""
    if not ckpt_dir.is_dir():
        return []
    return [p for p in ckpt_dir.iterdir() if p.suffix == ".ckpt" and not p.name.startswith(".")]


def resolve_ckpt_path(ckpt_dir: Path, ckpt_path: str | None) -> str | None:
    """The checkpoint file to pass to ``Trainer.fit`` (None: start at step 0).

    ``last``: the newest loadable checkpoint in ``ckpt_dir`` (highest global step, newest file
    on a tie); the skipped ones are logged by name. No checkpoint at all: None (a run killed
    before its first checkpoint simply starts again). An explicit path must load."""
    if ckpt_path is None:
        return None
    if ckpt_path != "last":
        path = Path(ckpt_path)
        if not path.exists():
            raise ResumeError(f"ckpt_path={ckpt_path} does not exist; point it at a .ckpt file "
                              "of a run, or use ckpt_path=last")
        found = inspect_checkpoint(path)
        if found.global_step is None:
            raise ResumeError(f"ckpt_path={ckpt_path} is not a loadable checkpoint: {found.problem}; "
                              "point it at a .ckpt written by mamba_train, or use ckpt_path=last")
        return str(path)
    paths = checkpoint_files(ckpt_dir)
    if not paths:
        log.info("ckpt_path=last: no checkpoint in %s yet, starting at step 0", ckpt_dir)
        return None
    inspected = [inspect_checkpoint(p) for p in paths]
    good = [c for c in inspected if c.global_step is not None]
    bad = [c for c in inspected if c.global_step is None]
    if not good:
        names = "; ".join(f"{c.path.name}: {c.problem}" for c in sorted(bad, key=lambda c: c.path.name))
        raise ResumeError(
            f"ckpt_path=last: none of the {len(bad)} checkpoints in {ckpt_dir} loads ({names}). "
            "Refusing to train over the run from step 0: restore a good checkpoint there, pass "
            "ckpt_path=<file>, or start a new run with run_name=<new name>")
    if any(c.path.is_dir() for c in good):  # sharded: no step read, the newest write wins
        best = max(good, key=lambda c: (_mtime(c.path), c.path.name == "last.ckpt"))
    else:
        best = max(good, key=lambda c: (c.global_step, _mtime(c.path), c.path.name == "last.ckpt"))
    newer_bad = [c for c in bad if _mtime(c.path) >= _mtime(best.path)]
    for c in bad:
        log.warning("ckpt_path=last: skipping %s (%s)", c.path, c.problem)
    if newer_bad:
        log.warning("ckpt_path=last: resuming from %s (step %d), the newest checkpoint that loads",
                    best.path, best.global_step)
    else:
        log.info("ckpt_path=last: resuming from %s (step %d)", best.path, best.global_step)
    return str(best.path)


def clean_checkpoint_dir(ckpt_dir: Path, keep_last_k: int, keep: str | None = None) -> list[Path]:
    """Remove partial ``.X.ckpt.*.tmp`` files and the oldest step files beyond ``keep_last_k``
    (never ``keep``, the checkpoint being resumed from). Returns what was removed.

    Call it only while holding the run lock (``run_lock.py``): then no other process of this run
    is writing into ``ckpt_dir``."""
    if not ckpt_dir.is_dir():
        return []
    removed = [p for p in ckpt_dir.iterdir() if PARTIAL_FILE.match(p.name) and p.is_file()]
    if keep_last_k > 0:
        steps = sorted(((int(m.group(1)), p.stat().st_mtime, p) for p in ckpt_dir.iterdir()
                        if (m := STEP_FILE.match(p.name)) and p.is_file()), reverse=True)
        keep_path = Path(keep).resolve() if keep else None
        removed += [p for _, _, p in steps[keep_last_k:] if p.resolve() != keep_path]
    for p in removed:
        p.unlink(missing_ok=True)
        log.info("removed %s (%s)", p, "partial write of an interrupted run"
                 if PARTIAL_FILE.match(p.name) else f"beyond keep_last_k={keep_last_k}")
    return removed


def checkpoint_dir(cfg) -> Path:
    """Where the run's checkpoints are: ``callbacks.model_checkpoint.dirpath`` when set (so
    ``ckpt_path=last`` looks where they are written), else ``<run dir>/checkpoints``."""
    from omegaconf import OmegaConf

    dirpath = OmegaConf.select(cfg, "callbacks.model_checkpoint.dirpath", default=None)
    return Path(dirpath) if dirpath else Path(cfg.run_dir) / "checkpoints"


def resume_command() -> str:
    """The command line of this run with ``ckpt_path=last`` (Hydra's overrides when under the CLI)."""
    import shlex

    try:
        from mamba_train.from_data import task_overrides
        overrides = task_overrides()
    except Exception:  # noqa: BLE001 -- not under Hydra's CLI (tests, notebooks)
        overrides = []
    keep = [o for o in overrides if not o.lstrip("+~").startswith("ckpt_path=")]
    return " ".join(["python -m mamba_train", *map(shlex.quote, keep), "ckpt_path=last"])
