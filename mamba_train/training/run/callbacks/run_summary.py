"""At the end of fit: a loss/LR plot (PNG) and a short summary (JSON + printed) in the run dir.

Reads the CSV logger's ``metrics.csv`` rather than keeping its own copy of the metrics, so the
plot shows exactly what was logged (and costs nothing during training).

``tokens_seen`` counts the samples the training loader handed out (all ranks), so it stays
true when the batch size changed between attempts. After a resume, what this attempt did not
measure (it ran no step: the time to the first step, how the step ran) is carried over from the
previous ``summary.json``, and ``wall_time_s`` adds up the attempts that wrote one. Both files
replace the old ones atomically (never written through a link); a failure to write them (a full
disk) is one warning: training has finished and its checkpoints are saved."""

from __future__ import annotations

import csv
import json
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


def _previous_summary(path: Path) -> dict[str, Any]:
    try:
        previous = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return previous if isinstance(previous, dict) else {}


class RunSummary(L.Callback):
    def __init__(self, tokens_per_step: int | None = None):
        self.tokens_per_step = tokens_per_step
        self._t0 = None

    def on_fit_start(self, trainer, pl_module):
        self._t0 = time.time()

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
        if trainer.ckpt_path:  # resumed: keep what only an earlier attempt measured
            previous = _previous_summary(run_dir / "summary.json")
            ran = summary["time_to_first_step_s"] is not None
            for key in ("time_to_first_step_s", "training_step"):
                if not ran and previous.get(key) is not None:
                    summary[key] = previous[key]
            if isinstance(previous.get("wall_time_s"), (int, float)) and summary["wall_time_s"]:
                summary["wall_time_s"] = round(summary["wall_time_s"] + previous["wall_time_s"], 1)
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
        return {
            "steps": trainer.global_step,
            "tokens_seen": self._tokens_seen(trainer),
            "wall_time_s": round(time.time() - self._t0, 1) if self._t0 else None,
            "last_checkpoint": getattr(trainer.checkpoint_callback, "last_model_path", None) or None,
            "skipped_nonfinite_steps": getattr(pl_module, "skipped_steps", 0),
            "training_step": getattr(pl_module, "training_step_mode", None),
            # the kernels that ran (models/kernels.py), not only the ones asked for
            "kernels": getattr(getattr(pl_module, "model", None), "kernels", None),
            # first optimizer step incl. kernel compile/autotune (training/run/callbacks/run_start.py)
            "time_to_first_step_s": next((cb.time_to_first_step_s for cb in trainer.callbacks
                                          if getattr(cb, "time_to_first_step_s", None) is not None), None),
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
