"""Experiment loggers beyond Lightning's defaults: Weights & Biases with a run id that survives
resumes, and a graceful absence when ``wandb`` is not installed.

Why a subclass of Lightning's ``WandbLogger``:

* **Resume continues the same W&B run.** ``WandbLogger`` accepts ``id=`` and passes
  ``resume="allow"``, but something has to remember the id between processes: it is kept in
  ``<run_dir>/wandb_run_id``. A resumed run (``ckpt_path`` set) reuses it; a fresh run writes a
  new one (so restarting a run that never checkpointed does not append to the old W&B run).
* **Each fit ends its W&B run.** ``WandbLogger.finalize`` uploads checkpoints but never calls
  ``run.finish()``; the process-global ``wandb.run`` then stays open and the *next* logger in
  the same process (the eval CLI, a test, a sweep) silently reuses it.
* **Offline unless asked.** ``mode`` defaults to ``$WANDB_MODE`` or ``offline`` (see
  ``conf/logger/wandb.yaml``), so the default logger works with no network and no login;
  ``wandb sync <run_dir>/wandb/offline-run-*`` uploads later.
"""

from __future__ import annotations

import logging
import os
import secrets
import string
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.loggers.logger import DummyLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from mamba_train.errors import MambaTrainError
from mamba_train.fileio import atomic_write_text
from mamba_train.training.lightning_compat import drop_unset_wandb_anonymous

log = logging.getLogger(__name__)

RUN_ID_FILE = "wandb_run_id"


class RunIdFileError(MambaTrainError, ValueError):
    """``<run dir>/wandb_run_id`` is not a W&B run id."""


def resolve_run_id(run_dir: str | Path, resume: bool) -> str:
    """The W&B run id for this run dir: the stored one when resuming, else a new one (stored).

    Only rank 0 writes the file; other ranks never start a W&B run."""
    path = Path(run_dir) / RUN_ID_FILE
    if resume and path.is_file():
        run_id = _read_run_id(path)
        if run_id:
            return run_id
    # W&B's own generator has moved between releases (wandb.util -> wandb.sdk.lib.runid); an id
    # is just 8 characters of [a-z0-9]
    run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
    if rank_zero_only.rank == 0:  # replaced, never written through a link planted there
        atomic_write_text(path, run_id + "\n")
    return run_id


def _read_run_id(path: Path) -> str:
    try:
        run_id = path.read_bytes().decode("ascii").strip()
    except UnicodeDecodeError:
        run_id = None
    if run_id is None or (run_id and not all(c.isalnum() or c in "-_" for c in run_id)) \
            or len(run_id) > 128:
        raise RunIdFileError(f"{path} does not hold a W&B run id (one line of letters, digits, "
                             "'-' or '_'); delete it to start a new W&B run, or restore it")
    return run_id


def wandb_logger(run_dir: str, ckpt_path: str | None = None, **kwargs: Any):
    """Hydra target for ``logger=wandb``: a :class:`RunWandbLogger`, or a do-nothing logger with
    one INFO line saying how to turn W&B on when ``wandb`` is not installed (it is an optional dependency: ``pip install wandb``),
    so the default config still trains on a bare install."""
    try:
        import wandb  # noqa: F401
    except ImportError:
        log.info("W&B logging is off (the wandb package is not installed); metrics go to "
                 "%s/metrics/metrics.csv. To turn it on: pip install wandb (offline by default; "
                 "WANDB_MODE=online after `wandb login` to log live)", run_dir)
        return DummyLogger()
    if kwargs.get("mode") == "offline" and "WANDB_SILENT" not in os.environ:
        # W&B's banner and end-of-run tables (a dozen "wandb:" lines) say nothing an offline
        # run needs beyond where its files are and how to upload them: one line of ours
        os.environ["WANDB_SILENT"] = "true"
        if rank_zero_only.rank == 0:
            log.info("W&B: offline run in %s/wandb (upload: wandb sync %s/wandb/offline-run-*; "
                     "WANDB_MODE=online logs live)", run_dir, run_dir)
    return RunWandbLogger(run_dir=run_dir, ckpt_path=ckpt_path, **kwargs)


def tensorboard_logger(**kwargs: Any):
    """Hydra target for ``logger=tensorboard``: Lightning's ``TensorBoardLogger``, or without
    ``tensorboard`` (and ``tensorboardX``, which Lightning also takes) a do-nothing logger and
    one warning with the install line, as for W&B: the run keeps its metrics.csv."""
    import importlib.util

    if not any(importlib.util.find_spec(name) for name in ("tensorboard", "tensorboardX")):
        log.warning("logger=tensorboard writes nothing: the tensorboard package is not installed "
                    "(pip install 'mamba_train[tensorboard]'); metrics still go to "
                    "%s/metrics/metrics.csv", kwargs.get("save_dir", "<run dir>"))
        return DummyLogger()
    from lightning.pytorch.loggers import TensorBoardLogger

    return TensorBoardLogger(**kwargs)


class RunWandbLogger(WandbLogger):
    """``WandbLogger`` + persisted run id + ``finish()`` at the end of fit.

    Args:
        run_dir: the training run's directory (W&B files go to ``<run_dir>/wandb``).
        ckpt_path: the run's ``ckpt_path``; not None means "resuming": reuse the stored id.
        **kwargs: ``WandbLogger``/``wandb.init`` arguments (``project``, ``name``, ``mode``,
            ``entity``, ``tags``, ``group``, ...).
    """

    def __init__(self, run_dir: str, ckpt_path: str | None = None, **kwargs: Any):
        kwargs.setdefault("save_dir", run_dir)
        if not (kwargs.get("id") or kwargs.get("version")):
            kwargs["id"] = resolve_run_id(run_dir, resume=ckpt_path is not None)
        super().__init__(**kwargs)
        drop_unset_wandb_anonymous(self)

    @rank_zero_only
    def finalize(self, status: str) -> None:
        super().finalize(status)
        if self._experiment is not None:
            self._experiment.finish(exit_code=0 if status == "success" else 1)
            self._experiment = None
