"""``ModelCheckpoint`` that writes its periodic checkpoints only after applied steps.

Under ``train.nan_policy=skip`` a run of skipped steps means the weights keep producing
non-finite losses or gradients (a diverged run: an LR spike can leave finite but useless
weights). Saving those states would rotate the last good checkpoints out of
``keep_last_k_checkpoints`` and leave only the blown-up ones; so while the latest step was
skipped the periodic save (step file and ``last.ckpt``) is held back and logged. The stop after
``train.max_consecutive_skips`` then leaves the last good checkpoint as the newest one.
"""

from __future__ import annotations

import logging

from lightning.pytorch.callbacks import ModelCheckpoint

log = logging.getLogger(__name__)


class GoodStepCheckpoint(ModelCheckpoint):
    def __init__(self, *args, every_n_train_steps: int | None = None, **kwargs):
        super().__init__(*args, every_n_train_steps=every_n_train_steps, **kwargs)
        self.save_every = every_n_train_steps or 0
        self._checked_step, self._holding = -1, False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        guard = getattr(pl_module, "nonfinite", None)
        step = trainer.global_step
        due = self.save_every and step % self.save_every == 0
        if due and guard is not None and guard.policy == "skip":
            if step != self._checked_step:  # once per step (one sync), not per micro-batch after it
                self._checked_step, self._holding = step, guard.in_skip_run()
                if self._holding:
                    log.warning("not saving the step-%d checkpoint: the last step was skipped for "
                                "non-finite loss/gradients (the last good checkpoint stays: %s)",
                                step, self.last_model_path or "none yet")
            if self._holding:
                return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
