"""Evaluate with lm-eval after training (``eval=local`` / ``eval=paper``), in-process on rank 0.

The model evaluated is the training module's own ``MambaLM`` at that moment -- the weights that
the checkpoint of that step holds -- so nothing is re-loaded or re-built: at the end of fit
(always), and every ``every_n_checkpoints`` checkpoints when set. Scores go to every logger as
``eval/<task>/<metric>`` at the current step, and to ``<run_dir>/eval/step<N>/results.{json,md}``
(the final one also to ``<run_dir>/eval/results.{json,md}``).

Precision: ``dtype=auto`` evaluates under bf16 autocast on CUDA (the ``bf16-mixed`` training
precision; the fp32 master weights are never cast) and fp32 on CPU. The module's train/eval
mode and the global RNG streams are restored afterwards, so a run that evaluates mid-training
resumes bit-exactly. Other ranks wait at a barrier: keep mid-training evaluations short
(``limit``) or they can outlast the collective timeout; sharded strategies (FSDP, ZeRO-3) hold
no full model on rank 0 and are not supported -- evaluate their checkpoints with
``python -m mamba_train.eval``. A failing evaluation (a task that cannot be downloaded, a missing
package) is logged with its traceback and training goes on, unless ``strict``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Any

import lightning as L

from mamba_train.training.step.train_step import step_ended

log = logging.getLogger(__name__)


class EvalAfterTraining(L.Callback):
    def __init__(self, tasks: Any, include_path: Any = None, limit: int | float | None = None,
                 batch_size: int = 16, num_fewshot: int | None = None, dtype: str = "auto",
                 max_length: int | None = None, tokenizer: str | None = None,
                 every_n_checkpoints: int | None = None, checkpoint_every_n_steps: int | None = None,
                 bootstrap_iters: int = 1000, strict: bool = False):
        from mamba_train.evaluation.runner import resolve_tasks
        self.tasks = resolve_tasks(tasks)
        self.include_path = include_path
        self.limit = limit
        self.batch_size = batch_size
        self.num_fewshot = num_fewshot
        self.dtype = dtype
        self.max_length = max_length
        self.tokenizer = tokenizer
        self.bootstrap_iters = bootstrap_iters
        self.strict = strict
        self.every_n_steps = (every_n_checkpoints * checkpoint_every_n_steps
                              if every_n_checkpoints and checkpoint_every_n_steps else None)
        self._evaluated_step = -1
        self._results: dict | None = None
        self.last_metrics: dict[str, float] = {}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        ended = step_ended(pl_module)
        if self.every_n_steps and ended is not None and ended.number % self.every_n_steps == 0:
            self._evaluate(trainer, pl_module, final=False)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._evaluate(trainer, pl_module, final=True)

    def _evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule, final: bool) -> None:
        step = trainer.global_step
        if trainer.is_global_zero:
            if step == self._evaluated_step:  # the last step was a checkpoint step: reuse it
                if final and self._results is not None:
                    self._write_final(trainer, step, self._results)
            else:
                try:
                    with contextlib.ExitStack() as paused:
                        for cb in trainer.callbacks:  # keep evaluation out of tokens/s and MFU
                            if hasattr(cb, "excluded_time"):
                                paused.enter_context(cb.excluded_time(trainer.strategy.root_device))
                        self._run(trainer, pl_module, step, final)
                except Exception:  # an evaluation problem must not end (or lose) a training run
                    if self.strict:
                        raise
                    log.exception("evaluation at step %d failed; training goes on (eval.strict=true "
                                  "makes this an error)", step)
        self._evaluated_step = step
        trainer.strategy.barrier("eval_after_training")

    def _write_final(self, trainer: L.Trainer, step: int, results: dict) -> None:
        from mamba_train.evaluation.runner import write_reports
        run_dir = Path(trainer.default_root_dir)
        _, md = write_reports(results, run_dir / "eval", source=f"{run_dir} at step {step}")
        log.info("evaluation at step %d:\n%s", step, md.read_text())

    def _run(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int, final: bool) -> None:
        from mamba_train.evaluation.lm_eval_adapter import MambaTrainLM
        from mamba_train.evaluation.runner import evaluate, flat_metrics, write_reports

        run_dir = Path(trainer.default_root_dir)
        tokenizer = self.tokenizer or _run_tokenizer(pl_module) or "default"
        was_training = pl_module.model.training
        t0 = time.time()
        log.info("evaluating step %d on %s", step, ", ".join(self.tasks))
        try:
            lm = MambaTrainLM(pretrained=pl_module.model, tokenizer=tokenizer,
                              batch_size=self.batch_size, dtype=self.dtype,
                              max_length=self.max_length)
            results = evaluate(lm, self.tasks, include_path=self.include_path, limit=self.limit,
                               num_fewshot=self.num_fewshot, bootstrap_iters=self.bootstrap_iters)
        finally:
            pl_module.model.train(was_training)
        write_reports(results, run_dir / "eval" / f"step{step:07d}", source=f"{run_dir} at step {step}")
        log.info("evaluated step %d in %.0f s", step, time.time() - t0)
        self._results = results
        if final:
            self._write_final(trainer, step, results)
        self.last_metrics = flat_metrics(results)
        for logger in trainer.loggers:  # the step train/loss of that step was logged at
            logger.log_metrics(self.last_metrics, step=step)
            logger.save()


def _run_tokenizer(pl_module: L.LightningModule) -> str | None:
    """The training data's tokenizer, from the resolved run config the module carries."""
    text = getattr(pl_module, "run_config", None)
    if not text:
        return None
    import yaml
    return ((yaml.safe_load(text) or {}).get("data") or {}).get("tokenizer")
