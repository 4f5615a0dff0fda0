"""Verify the S4/Mamba initialisation of a fresh model at fit start, after every framework hook
(materialisation, strategy setup) has run; skipped when resuming (the weights come from the
checkpoint then). See ``mamba_train/models/init.py`` for why this is needed."""

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
        from mamba_train.training.strategies.sharded import gathered_parameters
        with gathered_parameters(trainer.strategy, pl_module.model, ssm_parameters(pl_module.model)):
            n = check_ssm_init(pl_module.model)
        log.info("SSM init check passed for %d mixers on rank %d", n, trainer.global_rank)
