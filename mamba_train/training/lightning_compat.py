"""The only place mamba_train reaches into Lightning's private names.

Each accessor wraps one name that has no public equivalent in Lightning 2.5-2.6 (the range
``pyproject.toml`` pins); when Lightning changes one of them, this file is the one to fix.
Subclasses that *override* private hooks or read a parent's private attributes must do so in
their own classes; they are listed here so that one file names every private dependency:

* ``training/strategies/cpu_shims.py`` (CPU-process runs for the tests): ``_setup_model``,
  ``_full_state_dict_context``, ``_state_dict_type`` (FSDP); ``_setup_model_and_optimizer``, ``_init_deepspeed_distributed`` (DeepSpeed). No public
  hook lets a subclass change how the wrapped model or the process group is built.
* ``training/strategies/deepspeed.py``: ``_format_config``, the only place Lightning turns the
  precision flag into DeepSpeed config sections.
* ``training/strategies/fsdp.py``: ``_precision_plugin`` (the plugin swap behind the public
  ``precision_plugin`` property, to clip FSDP gradients by global norm).
* ``training/csv_logger.py``: ``ExperimentWriter._check_log_dir_exists`` (Lightning deletes
  ``metrics.csv`` there on restart; the resumable logger keeps it), ``_rewrite_with_new_header``
  (rewritten through the atomic writer: Lightning rewrites the file in place) and ``CSVLogger``'s
  ``_experiment`` / ``_fs`` (the ``experiment`` property it re-implements to use that writer).
"""

from __future__ import annotations

from typing import Any

import lightning as L


def should_accumulate(trainer: L.Trainer) -> bool:
    """True while the current micro-batch does not end an optimizer step.

    ``fit_loop.epoch_loop._should_accumulate()``: Lightning's own rule (accumulation window and
    the epoch's last batch); re-deriving it would drift from what DDP's no_sync decides.
    """
    return trainer.fit_loop.epoch_loop._should_accumulate()


def batches_that_stepped(trainer: L.Trainer) -> int:
    """The step number Lightning's loggers write (``epoch_loop._batches_that_stepped``).

    ``trainer.global_step`` counts optimizer steps, which matches it for one optimizer but is
    advanced at a different point in the loop; rows must land on the same step as ``self.log``'s.
    """
    return trainer.fit_loop.epoch_loop._batches_that_stepped


def should_update_logs(trainer: L.Trainer) -> bool:
    """Whether this step is a logging step (``_logger_connector.should_update_logs``).

    Lightning's rule also covers ``log_every_n_steps`` interplay with accumulation and the last
    batch; no public property exposes it.
    """
    return trainer._logger_connector.should_update_logs


def log_metrics(trainer: L.Trainer, metrics: dict[str, Any]) -> None:
    """Log through Lightning's connector (``_logger_connector.log_metrics``): same step, same
    ``epoch`` column, same loggers as ``LightningModule.log`` -- a callback's public
    ``self.log`` cannot be called from ``on_train_batch_end`` with host floats at a chosen step."""
    trainer._logger_connector.log_metrics(metrics)


def drop_unset_wandb_anonymous(logger) -> None:
    """Lightning 2.5-2.6's ``WandbLogger`` always passes ``anonymous=None`` to ``wandb.init``
    (kept in ``_wandb_init``); wandb >= 0.22 answers any explicit value with "The anonymous
    setting has no effect and will be removed" on every run. Not passing an unset value is the
    same init without the warning."""
    init = getattr(logger, "_wandb_init", None)
    if isinstance(init, dict) and init.get("anonymous") is None:
        init.pop("anonymous", None)
