"""SSM health every N optimizer steps: the quantities that go wrong first in an SSM.

Per layer ``i`` (keys ``ssm/layer{i:02d}/...``):

* ``dt_min`` / ``dt_median`` / ``dt_max``: softplus(Δ bias), the step size each channel (Mamba-1)
  or head (Mamba-2) takes when its input-dependent part is zero. Init puts it in
  [dt_min, dt_max] (1e-3..1e-1); collapsing to ~0 freezes the state, exploding to >1 makes it
  forget everything at once.
* ``A_min`` / ``A_max``: the range of A = -exp(A_log) (always negative; the decay rate per
  unit Δ). A drifting towards 0 means state that never decays; very negative, no memory.
* Mamba-3 (A is computed from the input, so no A range): the same ``dt_*`` of its Δ bias, and
  ``B_bias_rms`` / ``C_bias_rms``, the RMS of the learned B/C biases (1 at init; they replace
  the short convolution, so their collapse to 0 or blow-up shows first here).
* ``param_norm``: L2 norm of all the block's parameters (mixer, norms, MLP).
* ``update_norm``: L2 norm of the change of those parameters since the previous health log,
  and ``update_ratio`` = update_norm / param_norm (the effective relative learning rate).

Plus ``ssm/param_norm`` and ``ssm/update_norm`` over the whole model. Everything is computed on
the device and read with a single transfer per health log; the parameter snapshot for the
update norm lives in host memory (pinned, copied asynchronously on CUDA), so it costs no GPU
memory. Logged on rank 0 (DDP replicas are identical); under FSDP the numbers would describe
rank 0's shard only, and layers whose parameters are partitioned away (DeepSpeed ZeRO-3) are
skipped.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F

from mamba_train.training.step.train_step import step_ended

log = logging.getLogger(__name__)


def _local(t: torch.Tensor | None) -> torch.Tensor | None:
    """This rank's shard of an FSDP2 (DTensor) parameter: the monitor runs on rank 0 alone, and
    a DTensor op would wait for the other ranks. Plain tensors as they are."""
    return t.to_local() if hasattr(t, "to_local") else t


def _delta_bias(mixer: torch.nn.Module) -> torch.Tensor | None:
    if hasattr(mixer, "dt_bias"):                       # Mamba-2: one per head
        return _local(mixer.dt_bias)
    dt_proj = getattr(mixer, "dt_proj", None)           # Mamba-1: one per channel
    return _local(getattr(dt_proj, "bias", None))


class SSMHealthMonitor(L.Callback):
    def __init__(self, every_n_steps: int | None = 100, track_updates: bool = True):
        self.every_n_steps = every_n_steps
        self.track_updates = track_updates
        self._snapshot: dict[str, torch.Tensor] | None = None

    def _active(self, trainer: L.Trainer) -> bool:
        return bool(self.every_n_steps) and self.every_n_steps > 0 and trainer.is_global_zero

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._active(trainer):
            return
        self._log(trainer, pl_module.model, trainer.global_step)  # the state at start (init or resumed weights)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        ended = step_ended(pl_module)
        if ended is not None and self._active(trainer) and ended.number % self.every_n_steps == 0:
            self._log(trainer, pl_module.model, ended.number)

    @torch.no_grad()
    def health_stats(self, model: torch.nn.Module) -> dict[str, float]:
        """All statistics as {key: value}, with one device->host transfer."""
        keys: list[str] = []
        values: list[torch.Tensor] = []
        snapshot = self._snapshot
        total_sq, total_update_sq = [], []
        for block in model.backbone.layers:
            prefix = f"ssm/layer{block.layer_idx:02d}"
            if any(_local(p).numel() == 0 for p in block.parameters()):
                continue  # sharded away on this rank (DeepSpeed ZeRO-3): nothing to measure
            mixer = block.ssm_mixer  # inside a parallel block too; None in an MLP-only block
            bias = _delta_bias(mixer) if mixer is not None else None
            if bias is not None and hasattr(mixer, "A_log"):
                dt = F.softplus(bias.detach().float())
                A = -torch.exp(_local(mixer.A_log).detach().float())
                keys += [f"{prefix}/dt_min", f"{prefix}/dt_median", f"{prefix}/dt_max",
                         f"{prefix}/A_min", f"{prefix}/A_max"]
                values += [dt.min(), dt.median(), dt.max(), A.min(), A.max()]
            elif bias is not None and hasattr(mixer, "B_bias"):  # Mamba-3: A is data-dependent
                dt = F.softplus(bias.detach().float())
                keys += [f"{prefix}/dt_min", f"{prefix}/dt_median", f"{prefix}/dt_max",
                         f"{prefix}/B_bias_rms", f"{prefix}/C_bias_rms"]
                values += [dt.min(), dt.median(), dt.max(),
                           _local(mixer.B_bias).detach().float().square().mean().sqrt(),
                           _local(mixer.C_bias).detach().float().square().mean().sqrt()]
            named = [(f"backbone.layers.{block.layer_idx}.{n}", _local(p))
                     for n, p in block.named_parameters()]
            sq = torch.stack([p.detach().float().square().sum() for _, p in named]).sum()
            keys.append(f"{prefix}/param_norm")
            values.append(sq.sqrt())
            total_sq.append(sq)
            if snapshot is not None:
                usq = torch.stack([(p.detach().float() - snapshot[n].to(p.device, non_blocking=True)
                                    .float()).square().sum() for n, p in named]).sum()
                keys += [f"{prefix}/update_norm", f"{prefix}/update_ratio"]
                values += [usq.sqrt(), usq.sqrt() / sq.sqrt().clamp_min(1e-12)]
                total_update_sq.append(usq)
        if not total_sq:
            return {}
        keys.append("ssm/param_norm")
        values.append(torch.stack(total_sq).sum().sqrt())
        if total_update_sq:
            keys.append("ssm/update_norm")
            values.append(torch.stack(total_update_sq).sum().sqrt())
        numbers = torch.stack([v.float() for v in values]).cpu().tolist()  # the one sync
        return dict(zip(keys, numbers))

    @torch.no_grad()
    def take_snapshot(self, model: torch.nn.Module) -> None:
        if not self.track_updates:
            return
        names = {f"backbone.layers.{b.layer_idx}.{n}": _local(p) for b in model.backbone.layers
                 for n, p in b.named_parameters()}
        if self._snapshot is None:
            pin = torch.cuda.is_available() and any(p.is_cuda for p in names.values())
            self._snapshot = {n: torch.empty(p.shape, dtype=p.dtype, device="cpu", pin_memory=pin)
                              for n, p in names.items()}
        for n, p in names.items():
            self._snapshot[n].copy_(p.detach(), non_blocking=True)

    def _log(self, trainer: L.Trainer, model: torch.nn.Module, step: int) -> None:
        stats = self.health_stats(model)
        if not stats:
            return
        for logger in trainer.loggers:
            logger.log_metrics(stats, step=step)
        self.take_snapshot(model)
