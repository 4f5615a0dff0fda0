"""``ModelCheckpoint`` that writes its periodic checkpoints only after applied steps.

Under ``module.nan_policy=skip`` a run of skipped steps means the weights keep producing
non-finite losses or gradients (a diverged run: an LR spike can leave finite but useless
weights). Saving those states would rotate the last good checkpoints out of
``keep_last_k_checkpoints`` and leave only the blown-up ones; so while the latest step was
skipped the periodic save (step file and ``last.ckpt``) is held back and logged. The stop after
``module.max_consecutive_skips`` then leaves the last good checkpoint as the newest one.
"""

from __future__ import annotations

import logging

from lightning.pytorch.callbacks import ModelCheckpoint

from mamba_train.training.step.train_step import step_ended

log = logging.getLogger(__name__)


class GoodStepCheckpoint(ModelCheckpoint):
    def __init__(self, *args, every_n_train_steps: int | None = None, **kwargs):
        super().__init__(*args, every_n_train_steps=every_n_train_steps, **kwargs)
        self.save_every = every_n_train_steps or 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        ended = step_ended(pl_module)
        if ended is None:
            return  # inside an accumulation window: no new weights to save
        guard = pl_module.train_step.nonfinite
        due = self.save_every and ended.number % self.save_every == 0
        if due and guard.policy == "skip" and guard.in_skip_run():  # one sync, on due steps only
            log.warning("not saving the step-%d checkpoint: the last step was skipped for "
                        "non-finite loss/gradients (the last good checkpoint stays: %s)",
                        ended.number, self.last_model_path or "none yet")
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
