"""Training progress in optimizer steps of the run: a Rich bar on a terminal, log lines elsewhere.

``mode=auto`` draws the bar when stdout is a terminal and otherwise (``sbatch``, ``nohup``,
``> file``) writes one ``logging`` line every ``every_n_steps`` optimizer steps -- to the console
and the run's log file -- so a redirected run is never silent::

    step 50/200 | loss 4.7659 | lr 0.0028 | grad 0.706 | 1,840 tok/s | elapsed 0:00:57 | ETA 0:02:50
    val  step 50/200 | loss 5.6532 | ppl 285.2 | 3.1s

(the debug recipe on a 2-core CPU; with a known peak FLOP/s an ``MFU <x>%`` field follows tok/s)

Both count optimizer steps against ``trainer.max_steps`` (not epochs of the corpus, nor
micro-batches), with the ETA of the whole run: the mean step time since the first step, so the
bar's ETA is known from the second update on however far apart updates are (Rich's own estimate
looks at the last 30 s only: "-:--:--" between slow steps). In bar mode the same lines still go
to the run's log file (``<run dir>/mamba-train.log``), only the terminal shows the bar.

No host syncs beyond Lightning's own: values are read only at logging steps, where Lightning
reads the loss anyway. The rate is the host clock over the last interval, read after that loss
value (so queued GPU work has finished), minus validation time. MFU uses the FLOPs/token and peak
FLOP/s that the throughput callback (``StepThroughputMonitor``) determined.
"""

from __future__ import annotations

import logging
import sys
import time
from datetime import timedelta
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ProgressBar

from mamba_train.errors import MambaTrainError
from mamba_train.training.step.train_step import StepResult, step_ended

log = logging.getLogger("mamba_train.progress")
MODES = ("auto", "bar", "lines")


def _clock(seconds: float) -> str:
    return str(timedelta(seconds=int(max(seconds, 0))))


def _value(metrics: dict, key: str) -> float | None:
    v = metrics.get(key)
    return None if v is None else float(v)  # a device tensor: read at logging steps only


def _to_log_files(message: str) -> None:
    """``message`` to the run's log file(s) only (the terminal shows the bar)."""
    record = log.makeRecord(log.name, logging.INFO, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler) and record.levelno >= handler.level:
            handler.handle(record)


class StepProgress(ProgressBar):
    """Args:
        mode: ``auto`` (bar on a terminal, lines otherwise), ``bar`` or ``lines``.
        every_n_steps: optimizer steps between updates (``${trainer.log_every_n_steps}``).
        tokens_per_step: global tokens per optimizer step, for tok/s.
    """

    def __init__(self, mode: str = "auto", every_n_steps: int = 10, tokens_per_step: int | None = None):
        super().__init__()
        if mode not in MODES:
            raise MambaTrainError(f"callbacks.progress_bar.mode must be one of {MODES}, got {mode!r}")
        self.mode = ("bar" if sys.stdout.isatty() else "lines") if mode == "auto" else mode
        self.every_n_steps = max(1, int(every_n_steps))
        self.tokens_per_step = tokens_per_step
        self._enabled = True
        self._bar = None  # rich Progress in bar mode
        self._task = None
        self._swapped: list = []
        self._t_start = self._t_last = self._t_first_step = 0.0
        self._val_time = self._val_started = 0.0
        self._step_last = self._step_start = self._first_step = 0
        self._fields: dict[str, str] = {}

    # ProgressBar's interface
    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled and self.trainer.is_global_zero

    # ------------------------------------------------------------------ train
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t_start = self._t_last = time.perf_counter()
        self._step_last = self._step_start = trainer.global_step
        self._first_step = 0
        if self.is_enabled and self.mode == "bar":
            self._start_bar(trainer)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        ended = step_ended(pl_module)
        if not self.is_enabled or ended is None:
            return
        step = ended.number
        if not self._first_step:
            self._first_step, self._t_first_step = step, time.perf_counter()
        if step % self.every_n_steps and step != trainer.max_steps:
            return
        values = self._train_values(trainer, ended)
        if self.mode == "lines":
            log.info(self._train_line(trainer, values))
        else:
            _to_log_files(self._train_line(trainer, values))
            self._update_bar(trainer, values)

    def _train_values(self, trainer: L.Trainer, ended: StepResult) -> dict[str, float | None]:
        values = {"loss": float(ended.loss),  # the step's own values, read at logging steps only
                  "grad": None if ended.grad_norm is None else float(ended.grad_norm),
                  "lr": ended.lr}
        now = time.perf_counter()  # after the loss was read: the device has caught up
        step = ended.number
        busy = now - self._t_last - self._val_time
        values["tok_s"] = ((step - self._step_last) * self.tokens_per_step / busy
                           if self.tokens_per_step and busy > 0 else None)
        values["mfu"] = self._mfu(trainer, values["tok_s"])
        values["elapsed"] = now - self._t_start
        values["eta"] = None
        if self._first_step and step > self._first_step and trainer.max_steps > 0:
            per_step = (now - self._t_first_step) / (step - self._first_step)
            values["eta"] = per_step * (trainer.max_steps - step)
        self._t_last, self._step_last, self._val_time = now, step, 0.0
        return values

    @staticmethod
    def _mfu(trainer: L.Trainer, tok_s: float | None) -> float | None:
        monitor = next((cb for cb in trainer.callbacks if hasattr(cb, "flops_per_token")
                        and hasattr(cb, "available_flops")), None)
        if tok_s is None or monitor is None or not monitor.flops_per_token or not monitor.available_flops:
            return None
        return tok_s * monitor.flops_per_token / (monitor.available_flops * trainer.world_size)

    def _train_line(self, trainer: L.Trainer, v: dict[str, float | None]) -> str:
        parts = [f"step {trainer.global_step}/{trainer.max_steps}"]
        if v["loss"] is not None:
            parts.append(f"loss {v['loss']:.4f}")
        if v["lr"] is not None:
            parts.append(f"lr {v['lr']:.3g}")
        if v["grad"] is not None:
            parts.append(f"grad {v['grad']:.3g}")
        if v["tok_s"] is not None:
            parts.append(f"{v['tok_s']:,.0f} tok/s")
        if v["mfu"] is not None:
            parts.append(f"MFU {100 * v['mfu']:.1f}%")
        parts.append(f"elapsed {_clock(v['elapsed'])}")
        parts.append(f"ETA {_clock(v['eta'])}" if v["eta"] is not None else "ETA -")
        return " | ".join(parts)

    # ------------------------------------------------------------------ validation
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._val_started = time.perf_counter()
        if self._bar is not None and not trainer.sanity_checking:
            self._bar.update(self._task, description="validating")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        seconds = time.perf_counter() - self._val_started
        self._val_time += seconds
        if not self.is_enabled or trainer.sanity_checking:
            return
        loss = _value(trainer.callback_metrics, "val/loss")
        ppl = _value(trainer.callback_metrics, "val/ppl")
        parts = [f"val  step {trainer.global_step}/{trainer.max_steps}"]
        if loss is not None:
            parts.append(f"loss {loss:.4f}")
        if ppl is not None:
            parts.append(f"ppl {ppl:.1f}")
        parts.append(f"{seconds:.1f}s")
        if self.mode == "lines":
            log.info(" | ".join(parts))
        elif self._bar is not None:
            _to_log_files(" | ".join(parts))
            if loss is not None:
                self._fields["val"] = f"val {loss:.3f}"
            self._bar.update(self._task, description="train", info=" ".join(self._fields.values()))

    # ------------------------------------------------------------------ the bar (terminal)
    def _start_bar(self, trainer: L.Trainer) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                             TextColumn("steps"), TimeElapsedColumn(), TextColumn("ETA {task.fields[eta]}"),
                             TextColumn("{task.fields[info]}"), refresh_per_second=2)
        total = trainer.max_steps if trainer.max_steps > 0 else None
        self._task = self._bar.add_task("train", total=total, completed=trainer.global_step, info="",
                                        eta="-")
        self._bar.start()
        self._route_logging_through(sys.stdout)  # now Rich's proxy: log lines print above the bar

    def _update_bar(self, trainer: L.Trainer, v: dict[str, float | None]) -> None:
        if v["loss"] is not None:
            self._fields["loss"] = f"loss {v['loss']:.3f}"
        if v["tok_s"] is not None:
            self._fields["tok_s"] = f"{v['tok_s']:,.0f} tok/s"
        eta = {"eta": _clock(v["eta"])} if v["eta"] is not None else {}
        self._bar.update(self._task, completed=trainer.global_step,
                         info=" ".join(self._fields.values()), **eta)

    def _route_logging_through(self, stream) -> None:
        """Point console log handlers at ``stream`` (Rich's stdout proxy) while the bar is live."""
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                if handler.stream in (sys.__stdout__, sys.__stderr__):
                    self._swapped.append((handler, handler.stream))
                    handler.setStream(stream)

    def _stop_bar(self) -> None:
        if self._bar is None:
            return
        for handler, stream in self._swapped:
            handler.setStream(stream)
        self._swapped.clear()
        self._bar.stop()
        self._bar = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=trainer.global_step)
        self._stop_bar()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._stop_bar()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._stop_bar()
