"""Tokens/s, samples/s, model FLOP/s, MFU, tokens seen and peak GPU memory, per optimizer step.

Lightning's ``ThroughputMonitor`` (and the fabric ``Throughput`` window it feeds) does the rate
and MFU arithmetic and knows the peak FLOP/s of common accelerators
(``get_available_flops``); this subclass only changes *when* it measures, because the stock
callback calls ``torch.cuda.synchronize()`` after every micro-batch (a host sync per
micro-batch, which stalls the launch queue) and logs a "validate" series on the evaluation loop's
own step counter. Here:

* samples and tokens are the training step's own counts (``training/step/train_step.py``, from tensor
  shapes: no device access), taken once per optimizer step;
* the clock is read (after one ``cuda.synchronize``) only at logging steps
  (``trainer.log_every_n_steps``), so rates are exact over each logging interval and the
  extra cost is one sync per logged step, which reading the loss there costs anyway;
* validation time (and mid-training evaluations, see ``excluded_time``) is excluded from the
  training clock, and validation is not itself measured;
* keys use tokens (``tokens_per_sec``) rather than the generic "items", one key per quantity
  for the whole run (all devices; MFU is the same ratio per device), and the run-level counters
  are exact across resumes (``tokens_seen = global_step × global_batch_tokens``).

FLOPs come from :func:`mamba_train.models.flops.flops_per_token` at the batch's sequence length.
MFU needs the device's peak: taken from Lightning's table for the compute dtype, or from
``peak_flops`` (``callbacks.throughput.peak_flops``) when set -- needed for accelerators the table lacks and for
CPUs (no MFU is logged without a peak).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ThroughputMonitor
from lightning.pytorch.trainer.states import RunningStage
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from mamba_train.models.flops import flops_per_token, matmul_params
from mamba_train.training.lightning_compat import log_metrics
from mamba_train.training.step.train_step import step_ended

GIB = 2**30


def _batch_shape(batch: Any) -> tuple[int, int]:
    ids = batch["input_ids"] if isinstance(batch, dict) else batch[0]
    return int(ids.shape[0]), int(ids.shape[0] * ids.shape[1])


class StepThroughputMonitor(ThroughputMonitor):
    """Logs under ``train/``: ``tokens_per_sec``, ``samples_per_sec``, ``flops_per_sec`` (all
    devices), ``mfu``, ``tokens_seen``, ``samples_seen``,
    ``time_s``, and ``peak_mem_gib`` / ``reserved_mem_gib`` on CUDA. Once at the start:
    ``model/flops_per_token``, ``model/params``, ``model/matmul_params``, ``model/peak_flops``.

    Args:
        peak_flops: peak FLOP/s of one device for MFU; None = Lightning's table.
        window_size: number of logged steps the rates are averaged over (2 = the last logging
            interval).
        tokens_per_step: global tokens per optimizer step (``${train.global_batch_tokens}`` in conf/callbacks).
    """

    def __init__(self, peak_flops: float | None = None, window_size: int = 2,
                 tokens_per_step: int | None = None):
        super().__init__(batch_size_fn=lambda b: _batch_shape(b)[0],
                         length_fn=lambda b: _batch_shape(b)[1], window_size=window_size)
        self.peak_flops = peak_flops
        self.tokens_per_step = tokens_per_step
        self.flops_per_token: int | None = None
        self._seq_len: int | None = None
        self._pending_flops = 0
        self._val_paused_at: float | None = None

    # ------------------------------------------------------------------ setup
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.peak_flops:
            self.available_flops = float(self.peak_flops)
            for tp in self._throughputs.values():
                tp.available_flops = self.available_flops

    @rank_zero_only
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer)
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(trainer.strategy.root_device)

    # ------------------------------------------------------------------ training
    @rank_zero_only
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        ended = step_ended(pl_module)
        if ended is None:
            return  # inside an accumulation window
        stage = RunningStage.TRAINING
        seq_len = ended.tokens // ended.samples
        if self._seq_len != seq_len:  # first step, or a new length: recount
            self._seq_len = seq_len
            self.flops_per_token = flops_per_token(pl_module.model_config, seq_len)
            self._log_model_constants(trainer, pl_module, ended.number - 1)
        self._samples[stage] += ended.samples
        self._lengths[stage] += ended.tokens
        self._batches[stage] += ended.micro_batches
        self._pending_flops += self.flops_per_token * ended.tokens
        every = max(1, trainer.log_every_n_steps)
        if ended.number % every and ended.number != trainer.max_steps:
            return
        device = trainer.strategy.root_device
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # one sync per *logged* step, for an honest clock
        self._throughputs[stage].update(
            time=time.perf_counter() - self._t0s[stage], batches=self._batches[stage],
            samples=self._samples[stage], lengths=self._lengths[stage], flops=self._pending_flops,
        )
        self._pending_flops = 0
        metrics = self._step_metrics(trainer, self._throughputs[stage].compute())
        if device.type == "cuda":
            metrics["train/peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / GIB
            metrics["train/reserved_mem_gib"] = torch.cuda.memory_reserved(device) / GIB
            torch.cuda.reset_peak_memory_stats(device)
        log_metrics(trainer, metrics, step=ended.number)

    def _step_metrics(self, trainer: L.Trainer, raw: dict[str, float]) -> dict[str, float]:
        """Throughput's per-device rates -> the run's (tokens, not "items"), one key each."""
        ws = trainer.world_size
        out = {f"train/{new}": raw[old] * ws for old, new in (
            ("device/items_per_sec", "tokens_per_sec"), ("device/samples_per_sec", "samples_per_sec"),
            ("device/flops_per_sec", "flops_per_sec")) if old in raw}
        if "device/mfu" in raw:  # the same ratio for one device as for all of them
            out["train/mfu"] = raw["device/mfu"]
        out["train/time_s"] = raw["time"]
        out["train/samples_seen"] = raw["samples"] * ws
        out["train/tokens_seen"] = (trainer.global_step * self.tokens_per_step if self.tokens_per_step
                                    else raw["lengths"] * ws)
        return out

    def _log_model_constants(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        config = pl_module.model_config
        metrics = {"model/flops_per_token": float(self.flops_per_token),
                   "model/seq_len": float(self._seq_len),
                   "model/params": float(pl_module.model.num_parameters()),
                   "model/matmul_params": float(matmul_params(config))}
        if self.available_flops:
            metrics["model/peak_flops"] = float(self.available_flops)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    @contextmanager
    def excluded_time(self, device: torch.device | None = None):
        """Take a block of wall time out of the training clock (the eval-after-training callback
        runs its evaluations inside this)."""
        sync = device is not None and device.type == "cuda"
        if sync:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        try:
            yield
        finally:
            if sync:
                torch.cuda.synchronize(device)
            if RunningStage.TRAINING in self._t0s:
                self._t0s[RunningStage.TRAINING] += time.perf_counter() - start

    # ------------------------------------------------------------------ validation
    # Not measured (the stock callback would log it against the evaluation loop's own step
    # counter); its wall time is taken out of the training clock instead.
    @rank_zero_only
    def on_validation_start(self, trainer: L.Trainer, *_: Any) -> None:
        if trainer.sanity_checking or RunningStage.TRAINING not in self._t0s:
            return
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize(trainer.strategy.root_device)  # queued training work ends first
        self._val_paused_at = time.perf_counter()

    def on_validation_batch_end(self, *args: Any, **kwargs: Any) -> None:
        return

    @rank_zero_only
    def on_validation_end(self, trainer: L.Trainer, *_: Any) -> None:
        if self._val_paused_at is None:
            return
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize(trainer.strategy.root_device)
        self._t0s[RunningStage.TRAINING] += time.perf_counter() - self._val_paused_at
        self._val_paused_at = None
