"""Verify the S4/Mamba initialisation of a fresh model at fit start, after every framework hook
(materialisation, strategy setup) has run; skipped when resuming (the weights come from the
checkpoint then). See ``mamba_train/models/init.py`` for why this is needed.

A run started from released weights (``init_from``) has no S4 init to check: there the guard
checks that every loaded tensor is still bit-identical to the source (``training/run/init_from.py``)."""

from __future__ import annotations

import logging

import lightning as L

from mamba_train.models.init import check_ssm_init

log = logging.getLogger(__name__)


class SSMInitGuard(L.Callback):
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.ckpt_path is not None:
            return
        # sharded strategies (FSDP, ZeRO-3): read the full SSM parameters (a collective)
        from mamba_train.models.init import ssm_parameters
        from mamba_train.training.step.strategies.sharded import gathered_parameters
        loaded = getattr(pl_module, "loaded_weights", None)
        if loaded is not None:
            with gathered_parameters(trainer.strategy, pl_module.model):  # every tensor
                n = loaded.verify(pl_module.model)
            log.info("loaded weights preserved: %d tensors bit-identical to %s on rank %d",
                     n, loaded.source, trainer.global_rank)
            return
        with gathered_parameters(trainer.strategy, pl_module.model, ssm_parameters(pl_module.model)):
            n = check_ssm_init(pl_module.model)
        log.info("SSM init check passed for %d mixers on rank %d", n, trainer.global_rank)
