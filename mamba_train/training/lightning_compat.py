"""The only place mamba_train reaches into Lightning's private names.

Each accessor wraps one name that has no public equivalent in Lightning 2.5-2.6 (the range
``pyproject.toml`` pins); when Lightning changes one of them, this file is the one to fix.
Subclasses that *override* private hooks (the CPU-process strategy shims in
``training/strategies/cpu_shims.py``: ``_setup_model``, ``_setup_model_and_optimizer``,
``_format_config``, ``_full_state_dict_context``; the CSV logger's ``_check_log_dir_exists``)
are listed here for the same reason but must live in their classes.
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


def setup_activation_checkpointing(module, kwargs: dict) -> None:
    """Fabric's FSDP activation-checkpoint wrapper (``lightning.fabric.strategies.fsdp.
    _setup_activation_checkpointing``): the CPU FSDP shim builds the FSDP module itself and
    must apply the same policy Lightning would."""
    from lightning.fabric.strategies.fsdp import _setup_activation_checkpointing

    _setup_activation_checkpointing(module, kwargs)
