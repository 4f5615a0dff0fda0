"""At the end of fit: a loss/LR plot (PNG) and a short summary (JSON + printed) in the run dir.

Reads the CSV logger's ``metrics.csv`` rather than keeping its own copy of the metrics, so the
plot shows exactly what was logged (and costs nothing during training).

``tokens_seen`` counts the samples the training loader handed out (all ranks), so it stays
true when the batch size changed between attempts. Every checkpoint carries the run's wall time
so far, its time to the first step and how its steps ran (this callback's state): after a resume,
``wall_time_s`` adds this attempt to the time up to the checkpoint it resumed, and what this
attempt did not measure (it ran no step: it resumed at max_steps) is the checkpoint's. Both files
replace the old ones atomically (never written through a link); a failure to write them (a full
disk) is one warning: training has finished and its checkpoints are saved."""

from __future__ import annotations

import csv
import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import CSVLogger

from mamba_train.fileio import atomic_write, atomic_write_json

log = logging.getLogger(__name__)


def read_metrics_csv(path: Path) -> dict[str, list[tuple[int, float]]]:
    """{metric: [(step, value), ...]} from a Lightning CSVLogger file."""
    series: dict[str, list[tuple[int, float]]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            step = int(float(row["step"]))
            for key, value in row.items():
                if key in ("step", "epoch") or value in ("", None):
                    continue
                series.setdefault(key, []).append((step, float(value)))
    return series


def plot_metrics(series: dict[str, list[tuple[int, float]]], out: Path) -> Path | None:
    try:
        import matplotlib
    except ImportError:  # optional (the plot extra): the summary and metrics.csv still count
        log.info("no loss plot: matplotlib is not installed (pip install 'mamba_train[plot]')")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loss_keys = [k for k in ("train/loss", "val/loss") if k in series]
    lr_keys = [k for k in ("train/lr",) if k in series]
    if not loss_keys:
        return None
    fig, axes = plt.subplots(1, 2 if lr_keys else 1, figsize=(11 if lr_keys else 6, 4), squeeze=False)
    for key in loss_keys:
        steps, values = zip(*series[key])
        axes[0][0].plot(steps, values, label=key, marker="o" if key == "val/loss" else None)
    axes[0][0].set(xlabel="optimizer step", ylabel="cross-entropy (nats/token)", title="loss")
    axes[0][0].legend()
    if lr_keys:
        steps, values = zip(*series[lr_keys[0]])
        axes[0][1].plot(steps, values)
        axes[0][1].set(xlabel="optimizer step", ylabel="learning rate", title=lr_keys[0])
    fig.tight_layout()
    try:
        atomic_write(out, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)
    return out


class RunSummary(L.Callback):
    def __init__(self, tokens_per_step: int | None = None):
        self.tokens_per_step = tokens_per_step
        self._t0 = None
        self._fit: tuple[L.Trainer, L.LightningModule] | None = None
        self._carried: dict[str, Any] = {}  # the resumed checkpoint's state_dict()

    def on_fit_start(self, trainer, pl_module):
        self._t0 = time.time()
        self._fit = (trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        if self._fit is None:
            return {}
        measured = self._measured(*self._fit)
        return {**measured, "wall_time_s": self._wall_time()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._carried = dict(state_dict)

    def _wall_time(self) -> float | None:
        if self._t0 is None:
            return None
        carried = self._carried.get("wall_time_s")
        return round(time.time() - self._t0 + (carried if isinstance(carried, (int, float)) else 0), 1)

    def _measured(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        """What only an attempt that ran a step knows; the checkpoint's when this one ran none."""
        first = next((cb.time_to_first_step_s for cb in trainer.callbacks
                      if getattr(cb, "time_to_first_step_s", None) is not None), None)
        if first is None and self._carried.get("time_to_first_step_s") is not None:
            return {k: self._carried.get(k) for k in ("time_to_first_step_s", "training_step")}
        # first optimizer step incl. kernel compile/autotune (training/run/callbacks/run_start.py)
        return {"time_to_first_step_s": first,
                "training_step": getattr(pl_module, "training_step_mode", None) if first else None}

    def _tokens_seen(self, trainer: L.Trainer) -> int | None:
        consumed = getattr(getattr(trainer, "datamodule", None), "train_tokens_consumed", None)
        if consumed is not None:
            return consumed
        return trainer.global_step * self.tokens_per_step if self.tokens_per_step else None

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        run_dir = Path(trainer.default_root_dir)
        summary = self._summary(trainer, pl_module)
        try:
            self._add_metrics(trainer, run_dir, summary)
        except OSError as e:
            log.warning("no loss plot: %s", e)
        try:
            atomic_write_json(run_dir / "summary.json", summary)
        except OSError as e:
            log.warning("summary.json not written: %s", e)
        lines = [f"{k}: {v}" for k, v in summary.items() if v is not None]
        log.info("run summary (%s):\n  %s", run_dir / "summary.json", "\n  ".join(lines))

    def _summary(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        measured = self._measured(trainer, pl_module)
        return {
            "steps": trainer.global_step,
            "tokens_seen": self._tokens_seen(trainer),
            "wall_time_s": self._wall_time(),
            "last_checkpoint": getattr(trainer.checkpoint_callback, "last_model_path", None) or None,
            "skipped_nonfinite_steps": getattr(pl_module, "skipped_steps", 0),
            "training_step": measured["training_step"],
            # the kernels that ran (models/kernels.py), not only the ones asked for
            "kernels": getattr(getattr(pl_module, "model", None), "kernels", None),
            "time_to_first_step_s": measured["time_to_first_step_s"],
        }

    @staticmethod
    def _add_metrics(trainer: L.Trainer, run_dir: Path, summary: dict[str, Any]) -> None:
        csv_logger = next((lg for lg in trainer.loggers if isinstance(lg, CSVLogger)), None)
        if csv_logger is None:
            return
        csv_logger.save()
        metrics_file = Path(csv_logger.log_dir) / "metrics.csv"
        if not metrics_file.is_file():
            return
        series = read_metrics_csv(metrics_file)
        for key in ("train/loss", "val/loss", "val/ppl"):
            if series.get(key):
                summary[f"final_{key.replace('/', '_')}"] = series[key][-1][1]
        if series.get("val/loss"):  # the step it was measured at (not always the last one)
            summary["final_val_loss_step"] = series["val/loss"][-1][0]
        if series.get("train/loss"):
            summary["first_train_loss"] = series["train/loss"][0][1]
        summary["plot"] = None
        plot = plot_metrics(series, run_dir / "loss.png")
        summary["plot"] = str(plot) if plot else None
