"""Mixture-of-experts balancing during training (``models/moe.py``).

* After every optimizer step: the auxiliary-loss-free update of each router's correction bias
  (layers with ``moe_cfg.bias_update_rate > 0``), over the expert load since the previous step,
  summed over the data-parallel ranks first so every replica moves its bias the same way. The
  update runs on the device, outside the gradient and outside a captured step's graph (the
  graph reads the bias buffer in place).
* Every ``log_every_n_steps``: per MoE layer ``moe/layer{i:02d}/imbalance`` (max/mean expert
  load), ``max_load`` (the busiest expert's share of the assignments) and ``router_entropy``
  (nats), accumulated on the device over the interval and read in one transfer.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from mamba_train.models.moe import moe_layers, moe_stats, update_router_bias
from mamba_train.training.lightning_compat import log_metrics
from mamba_train.training.step.train_step import step_ended


class MoEBalance(L.Callback):
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        ended = step_ended(pl_module)
        if ended is None:
            return  # mid-accumulation: the load keeps accumulating until the optimizer step
        model = pl_module.model
        layers = moe_layers(model)
        if not layers:
            return
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            for _, m in layers:
                torch.distributed.all_reduce(m.bias_load)
        update_router_bias(model)  # once per optimizer step: step_ended is set for one batch
        if ended.number % max(1, trainer.log_every_n_steps) == 0:
            self._log(trainer, model, ended.number)

    def _log(self, trainer: L.Trainer, model: torch.nn.Module, step: int) -> None:
        stats = moe_stats(model)  # every rank: reading resets its interval's sums
        if not trainer.is_global_zero:
            return
        keys, values = [], []
        for name, value in stats.items():
            layer, _, what = name.rpartition(".")
            idx = int(layer.split("layers.")[1].split(".")[0]) if "layers." in layer else 0
            if what == "load":
                keys.append(f"moe/layer{idx:02d}/max_load")
                values.append(value.max())
            else:
                keys.append(f"moe/layer{idx:02d}/{what}")
                values.append(value)
        host = torch.stack([v.float() for v in values]).cpu().tolist()  # one transfer
        log_metrics(trainer, dict(zip(keys, host)), step=step)
