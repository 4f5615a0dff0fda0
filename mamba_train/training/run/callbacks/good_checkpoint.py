"""``ModelCheckpoint`` that writes its periodic checkpoints only after applied steps, and after
the validation of their step.

A checkpoint of a step that is followed by a validation is written once that validation has
ended: written before it (Lightning's order), a kill inside the validation left a checkpoint that
Lightning resumes past the validation (it counts it as done), so the run never had a val loss at
that step and summary.json reported an older one. Written after it, a kill inside the validation
resumes from the previous checkpoint and redoes the steps and the validation; Lightning resumes a
checkpoint written at the validation's end without validating again.

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

from mamba_train.training.lightning_compat import validation_follows
from mamba_train.training.step.train_step import step_ended

log = logging.getLogger(__name__)


class GoodStepCheckpoint(ModelCheckpoint):
    def __init__(self, *args, every_n_train_steps: int | None = None, **kwargs):
        super().__init__(*args, every_n_train_steps=every_n_train_steps, **kwargs)
        self.save_every = every_n_train_steps or 0
        self._after_validation = False  # a due save waits for the validation of its step

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
        if due and validation_follows(trainer):
            self._after_validation = True
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._after_validation and not self._should_skip_saving_checkpoint(trainer):
            self._after_validation = False
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)
        super().on_validation_end(trainer, pl_module)
