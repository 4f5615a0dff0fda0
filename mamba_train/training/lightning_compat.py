"""The only place mamba_train reaches into Lightning's private names.

Each accessor wraps one name that has no public equivalent in Lightning 2.5-2.6 (the range
``pyproject.toml`` pins); when Lightning changes one of them, this file is the one to fix.
Subclasses that *override* private hooks or read a parent's private attributes must do so in
their own classes; they are listed here so that one file names every private dependency:

* ``training/step/strategies/cpu_shims.py`` (CPU-process runs for the tests): ``_setup_model``,
  ``_full_state_dict_context``, ``_state_dict_type`` (FSDP); ``_setup_model_and_optimizer``, ``_init_deepspeed_distributed`` (DeepSpeed). No public
  hook lets a subclass change how the wrapped model or the process group is built.
* ``training/step/strategies/fsdp.py``: ``_state_dict_type`` (whether a checkpoint is one full
  file), read where it renumbers the optimizer state of a full checkpoint.
* ``training/step/strategies/deepspeed.py``: ``_format_config``, the only place Lightning turns the
  precision flag into DeepSpeed config sections.
* ``training/step/nonfinite.py`` (a torch handshake, not Lightning): ``optimizer.found_inf``, the
  device flag ``torch.amp.GradScaler`` hands to fused optimizers (``torch.optim.AdamW(fused=True)``
  reads it in ``step`` and leaves weights, moments and step count alone when it is set). It is
  set as an attribute, as ``GradScaler._maybe_opt_step`` does; torch does not document it.
* ``training/run/callbacks/good_checkpoint.py``: ``ModelCheckpoint._monitor_candidates``,
  ``_save_topk_checkpoint``, ``_save_last_checkpoint`` (the save of a periodic checkpoint that
  waits for the validation of its step; Lightning's own waiting flag differs between 2.5 and 2.6).
* ``training/run/csv_logger.py``: ``ExperimentWriter._check_log_dir_exists`` (Lightning deletes
  ``metrics.csv`` there on restart; the resumable logger keeps it), ``_rewrite_with_new_header``
  (rewritten through the atomic writer: Lightning rewrites the file in place) and ``CSVLogger``'s
  ``_experiment`` / ``_fs`` (the ``experiment`` property it re-implements to use that writer).
"""

from __future__ import annotations

from typing import Any

import lightning as L


def log_metrics(trainer: L.Trainer, metrics: dict[str, Any], step: int) -> None:
    """Log at ``step`` through Lightning's connector (``_logger_connector.log_metrics``): the same
    loggers and tensor-to-scalar conversion as ``LightningModule.log``, and ``trainer.logged_metrics``
    kept. ``self.log`` cannot choose the step: it writes Lightning's own 0-based counter, while
    every metric here is logged at the 1-based step it follows (the checkpoint's number)."""
    trainer._logger_connector.log_metrics(metrics, step=step)


def replace_restored_signal_handler(trainer: L.Trainer, signum: int, handler) -> None:
    """Lightning's signal connector saved the handlers it found when fit started
    (``_signal_connector._original_handlers``) and reinstalls them at its teardown, after the
    callbacks' teardown; a callback that restored ``signum`` itself has that entry follow."""
    saved = getattr(getattr(trainer, "_signal_connector", None), "_original_handlers", None)
    if isinstance(saved, dict) and signum in saved:
        saved[signum] = handler


def drop_unset_wandb_anonymous(logger) -> None:
    """Lightning 2.5-2.6's ``WandbLogger`` always passes ``anonymous=None`` to ``wandb.init``
    (kept in ``_wandb_init``); wandb >= 0.22 answers any explicit value with "The anonymous
    setting has no effect and will be removed" on every run. Not passing an unset value is the
    same init without the warning."""
    init = getattr(logger, "_wandb_init", None)
    if isinstance(init, dict) and init.get("anonymous") is None:
        init.pop("anonymous", None)


def validation_follows(trainer: L.Trainer) -> bool:
    """Whether Lightning validates right after the current training batch: the epoch loop's own
    decision (``_should_check_val_fx`` on the fit loop's ``_data_fetcher``), taken in
    ``on_train_batch_end`` before Lightning takes it again for the same batch."""
    fetcher = trainer.fit_loop._data_fetcher
    return fetcher is not None and bool(trainer.fit_loop.epoch_loop._should_check_val_fx(fetcher))


def fsdp_full_state_dict_context(module, world_size: int, rank0_only: bool):
    """Lightning's context for FSDP1 full state dicts (``fabric.strategies.fsdp.
    _get_full_state_dict_context``): the full-state-dict type with the configs Lightning's own
    save and load use, so a checkpoint read through it matches one Lightning wrote."""
    from lightning.fabric.strategies.fsdp import _get_full_state_dict_context

    return _get_full_state_dict_context(module, world_size=world_size, rank0_only=rank0_only)


def load_full_module_state(state: dict, module, world_size: int, strict: bool) -> None:
    """A full (unsharded) state dict into an FSDP-wrapped module, as Lightning's own FSDP load
    does it (``fabric.strategies.model_parallel._load_raw_module_state``)."""
    from lightning.fabric.strategies.model_parallel import _load_raw_module_state

    _load_raw_module_state(state, module=module, world_size=world_size, strict=strict)
