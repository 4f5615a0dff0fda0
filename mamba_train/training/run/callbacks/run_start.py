"""What a run says when it starts: the model summary, and the first step's kernel warm-up.

Replaces Lightning's model summary table (its FLOPs column reads 0 for this model, and it says
nothing about the backend or the training step) by one block: parameters, FLOPs per token,
backend, mixer per layer, precision, strategy and whether the step runs as a CUDA graph (and why).

**Warm-up.** On a GPU the first optimizer step compiles and autotunes mamba_ssm's Triton kernels
(a minute or more for Mamba-2; several for new kernels). It is announced before it starts and
timed once (one ``cuda.synchronize`` on the first step only): ``time_to_first_step_s`` (from the
start of training) goes to the log and to ``summary.json``. Compiled kernels and autotune results
persist across runs of the same shapes through ``TRITON_CACHE_DIR`` / ``TRITON_CACHE_AUTOTUNING``
(``mamba_train.cli.console.default_kernel_caches``, set by the command-line entry).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import lightning as L
import torch

from mamba_train.errors import MambaTrainError
from mamba_train.training.step.train_step import step_ended

log = logging.getLogger("mamba_train.run")


def _mixers(config) -> str:
    """``Mamba2 x 22, attention at 5, 13`` style description of the block stack (with a layer
    pattern: the pattern, and its SSM / attention / MLP counts)."""
    if config.layer_pattern:
        blocks = config.blocks
        return (f"pattern {config.layer_pattern}: {config.layer} x {config.n_ssm_layers}, "
                f"attention x {config.n_attention_layers}, MLP x {sum(b.mlp for b in blocks)}")
    attn = sorted(int(i) for i in config.attn_layer_idx)
    kind = config.layer
    text = f"{kind} x {config.n_layer - len(attn)}"
    if attn:
        text += f", attention x {len(attn)} (layers {', '.join(map(str, attn))})"
    return text


def model_summary(trainer: L.Trainer, pl_module: L.LightningModule, seq_len: int | None) -> str:
    from mamba_train.models.flops import flops_per_token

    config, model = pl_module.model_config, pl_module.model
    n_params = model.num_parameters() if hasattr(model, "num_parameters") else sum(
        p.numel() for p in model.parameters())
    lines = [f"parameters: {n_params / 1e6:,.2f} M ({config.n_layer} layers, d_model {config.d_model}, "
             f"vocab {config.vocab_size})"]
    if getattr(config, "n_moe_layers", 0) and hasattr(model, "num_active_parameters"):
        lines[0] += f", {model.num_active_parameters() / 1e6:,.2f} M active per token"
    if seq_len:
        lines.append(f"FLOPs/token (training, seq_len {seq_len}): {flops_per_token(config, seq_len) / 1e6:,.1f} M")
    lines.append(f"backend: {getattr(model, 'backend', 'unknown')}")
    lines.append(f"mixers: {_mixers(config)}")
    lines.append(f"precision: {trainer.precision}")
    lines.append(f"strategy: {type(trainer.strategy).__name__} x {trainer.world_size}")
    lines.append(f"training step: {getattr(pl_module, 'training_step_mode', 'eager')}")
    lines.append(_peak_flops(trainer))
    return "model summary:\n  " + "\n  ".join(lines)


def _peak_flops(trainer: L.Trainer) -> str:
    """Where MFU's denominator comes from, or why there is no MFU (said once, here)."""
    monitor = next((cb for cb in trainer.callbacks if hasattr(cb, "available_flops")), None)
    peak = getattr(monitor, "available_flops", None)
    if monitor is None:
        return "MFU: off (callbacks.throughput is disabled)"
    if peak:
        return f"MFU: peak {peak / 1e12:,.0f} TFLOP/s per device"
    device = trainer.strategy.root_device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return f"MFU: off (no peak FLOP/s known for {name}; set callbacks.throughput.peak_flops=<FLOP/s per device>)"


class RunStartReport(L.Callback):
    """Logs the model summary before the first step, announces and times the kernel warm-up.

    Attributes:
        time_to_first_step_s: seconds from the start of training to the end of the first
            optimizer step (read by ``RunSummary`` into ``summary.json``).
    """

    def __init__(self, seq_len: int | None = None):
        self.seq_len = seq_len
        self.time_to_first_step_s: float | None = None
        self._t0: float | None = None
        self._announced = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t0 = time.perf_counter()
        self._announced = False
        self.time_to_first_step_s = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._announced:
            return
        self._announced = True  # after the module's on_train_start: the graph decision is made
        if not trainer.is_global_zero:
            return
        log.info(model_summary(trainer, pl_module, self.seq_len))
        if getattr(pl_module.model, "backend", None) == "fused":
            cache = os.environ.get("TRITON_CACHE_DIR", "~/.triton/cache (Triton's default)")
            log.info("compiling/autotuning kernels for the first step (Triton cache: %s; a later "
                     "run of the same shapes reuses it)...", cache)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if self.time_to_first_step_s is not None or step_ended(pl_module) is None:
            return
        device = trainer.strategy.root_device
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # once: the first step's kernels have run
        self.time_to_first_step_s = round(time.perf_counter() - self._t0, 2)
        if trainer.is_global_zero:
            log.info("first optimizer step done after %.1f s", self.time_to_first_step_s)


class ModelTooLargeError(MambaTrainError, ValueError):
    """The configured model's parameters alone cannot fit the memory there is."""


def parameter_count(config) -> int:
    """The model's parameter count without building it: one Mamba block and (for a hybrid) one
    attention block are counted on the meta device (no memory), then scaled by the layer counts,
    so that a mistyped ``n_layer=1e5`` is counted in milliseconds. A ``layer_pattern`` model
    (blocks of different kinds, its length fixing ``n_layer``) is counted whole, on the meta
    device too."""
    import dataclasses

    from mamba_train.models.lm import MambaLM

    if getattr(config, "layer_pattern", None):
        model = MambaLM(config, backend="reference", device="meta")
        return sum(p.numel() for p in model.parameters())

    def count(n_layer: int, attn: list[int]) -> int:
        small = dataclasses.replace(config, n_layer=n_layer, attn_layer_idx=attn)
        return sum(p.numel() for p in MambaLM(small, backend="reference", device="meta").parameters())

    one, two = count(1, []), count(2, [])
    block, base = two - one, 2 * one - two
    attn = len(config.attn_layer_idx)
    attn_block = count(1, [0]) - base if attn else 0
    return base + (config.n_layer - attn) * block + attn * attn_block


def check_model_memory(config, available_bytes: int | None = None) -> int:
    """Refuse, in one line and before any allocation, a model that cannot fit: it is built on
    the host in fp32 (4 bytes a parameter), and trained there on a CPU-only machine (16: weights,
    gradients, AdamW's two moments). A mistyped d_model or n_layer would otherwise allocate for
    minutes before failing. Returns the parameter count."""
    n = parameter_count(config)
    if available_bytes is None:
        available_bytes = _available_host_memory()
    per_param, what = (4, "its fp32 weights") if torch.cuda.is_available() else \
        (16, "training on the CPU (fp32 weights, gradients and AdamW's two moments)")
    if available_bytes and per_param * n > available_bytes:
        raise ModelTooLargeError(
            f"model.d_model={config.d_model}, model.n_layer={config.n_layer} make "
            f"{n / 1e9:,.2f} B parameters: {what} need {per_param * n / 2**30:,.0f} GiB, more "
            f"than the {available_bytes / 2**30:,.0f} GiB of host memory available; check the "
            "model size")
    return n


def _available_host_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
