"""Send the resolved run config to every logger (W&B config, TensorBoard hparams, CSV
``hparams.yaml``) at fit start.

Why not ``save_hyperparameters``: the module sees only its own arguments, while a run is defined
by the whole composed Hydra config (data, schedule, batch arithmetic, recipe). ``train.py``
already hands that config, resolved, to the module as ``run_config`` (it is also stored in every
checkpoint); this callback forwards it, so the logged config is the one that ran.
"""

from __future__ import annotations

import lightning as L
import yaml


class LogRunConfig(L.Callback):
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        text = getattr(pl_module, "run_config", None)
        if not text or not trainer.loggers:
            return
        config = yaml.safe_load(text)
        for logger in trainer.loggers:
            logger.log_hyperparams(config)
