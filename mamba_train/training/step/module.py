"""The LightningModule: builds the model in ``configure_model``, computes the fp32 chunked loss,
hands every micro-batch and optimizer step to ``TrainStep`` (``training/step/train_step.py``, where the
step reads in order), logs the step and validation metrics at the step they follow, groups
parameters for weight decay by name, and puts the model config and RNG states into every
checkpoint."""

from __future__ import annotations

import random
from typing import Any, Callable

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info

from mamba_train.formats.checkpoint import CKPT_CONFIG_KEY, RNG_KEY, RUN_CONFIG_KEY
from mamba_train.models.config import ConfigError, MambaLMConfig
from mamba_train.models.kernels import apply_kernels
from mamba_train.training.step.activation_checkpointing import (apply_activation_checkpointing,
                                                          checkpointed_block_indices,
                                                          normalize_policy)
from mamba_train.training.step.activation_checkpointing import describe as describe_checkpointing
from mamba_train.training.lightning_compat import log_metrics
from mamba_train.training.step.nonfinite import NonFiniteLossError  # noqa: F401 (re-exported)
from mamba_train.training.step.optim import build_optimizer
from mamba_train.training.step.train_step import TrainStep, step_ended


class MambaLMModule(L.LightningModule):
    """Every argument is a ``module`` group setting (``conf/module/default.yaml`` holds the
    defaults; values are checked by ``config_checks.py`` before anything is built)."""

    def __init__(
        self,
        model_config: dict | MambaLMConfig,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None,
        backend: str,
        weight_decay: float,
        loss_chunk_size: int,
        nan_policy: str,
        max_consecutive_skips: int,
        cuda_graph: str,
        cuda_graph_allreduce: str,
        kernels: dict,
        activation_checkpointing: str | bool,
        activation_checkpointing_k: int,
        run_config: str | None = None,
        init_from: Any = None,
    ):
        """``model_config`` describes the network (``self.model`` is the ``nn.Module`` built from
        it in ``configure_model``); ``optimizer`` is a partial taking the parameter groups."""
        super().__init__()
        self.activation_checkpointing = normalize_policy(activation_checkpointing)
        checkpointed_block_indices(1, self.activation_checkpointing, activation_checkpointing_k)
        self.activation_checkpointing_k = activation_checkpointing_k
        self.model_config = (model_config if isinstance(model_config, MambaLMConfig)
                             else MambaLMConfig.from_dict(dict(model_config)))
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler or None  # scheduler=constant interpolates to {}
        self.backend = backend
        self.weight_decay = weight_decay
        self.loss_chunk_size = loss_chunk_size
        self.run_config = run_config
        self.cuda_graph_allreduce = cuda_graph_allreduce
        self.kernels = dict(kernels)  # applied in configure_model; what ran: self.model.kernels
        self.init_from = init_from  # training/run/init_from.py: InitFrom, the source of a continued run
        self.loaded_weights = None  # its fingerprints once loaded (checked by the init guard)
        self.model = None
        self._val_sum, self._val_tokens = None, 0
        # the optimizer step, in order (training/step/train_step.py); set up at fit start
        self.train_step = TrainStep(self._loss, nan_policy, max_consecutive_skips, cuda_graph)

    # ------------------------------------------------------------------ model
    def setup(self, stage: str) -> None:
        # init_from: the vocabulary comes from the data (validated by the datamodule's setup)
        datamodule = self._trainer.datamodule if self._trainer is not None else None
        if self.init_from is not None and self.model is None and hasattr(datamodule, "vocab_size"):
            self.model_config = self.init_from.fit_vocabulary(datamodule.vocab_size,
                                                              getattr(datamodule, "eos_id", None))

    def configure_model(self) -> None:
        # Called by Lightning inside the strategy's init contexts (meta device for sharded
        # strategies, which then materialise through MambaLM.reset_parameters).
        if self.model is None:
            from mamba_train.training.step.strategies.sharded import build_model_for  # strategy-aware (ZeRO-3)
            strategy = self._trainer.strategy if self._trainer is not None else None
            weights = None
            if self.init_from is not None and not self.init_from.resuming:
                weights, self.loaded_weights = self.init_from.take_state()
            self.model = build_model_for(strategy, self.model_config, backend=self.backend,
                                         weights=weights)
            self.model.kernels = apply_kernels(self.model, **self.kernels)
            # the one place it is applied, for every strategy (before any sharding wrapper)
            if apply_activation_checkpointing(self.model, self.activation_checkpointing,
                                              self.activation_checkpointing_k):
                rank_zero_info(describe_checkpointing(self.model))

    def forward(self, input_ids, seq_idx=None, labels=None):
        return self.model(input_ids, seq_idx=seq_idx, labels=labels,
                          loss_chunk_size=self.loss_chunk_size)

    def _loss(self, batch: dict) -> torch.Tensor:
        return self(batch["input_ids"], seq_idx=batch.get("seq_idx"), labels=batch["labels"]).loss

    # ------------------------------------------------------------------ the step (training/step/train_step.py)
    def training_step(self, batch: dict, batch_idx: int):
        return self.train_step.forward_backward(batch)

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        self.train_step.step(optimizer_closure)

    # the step does these itself, in its order: Lightning's versions are switched off
    def backward(self, loss: torch.Tensor, *args, **kwargs) -> None:
        if self.train_step.graph is None:  # the captured step has run its backward already
            super().backward(loss, *args, **kwargs)

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer) -> None:
        pass  # zeroed at the end of every step (TrainStep.zero_grad)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None,
                                    gradient_clip_algorithm=None) -> None:
        pass  # TrainStep.clip, which also returns the logged norm

    def lr_scheduler_step(self, scheduler, metric) -> None:
        pass  # stepped right after the optimizer in TrainStep.step

    def on_validation_model_zero_grad(self) -> None:
        self.train_step.zero_grad()  # keeps the graph step's gradient buffer bound

    def on_train_start(self) -> None:
        if self.init_from is not None:
            self.init_from.check_resumed(self.trainer.ckpt_path)
        self.train_step.setup(self.trainer, self)
        # a restarted or resumed run redoes the steps after global_step: drop their rows from
        # the CSV log (all of them when a run killed before its first checkpoint starts over)
        for logger in self.loggers:
            if hasattr(logger, "prune_from_step"):
                logger.prune_from_step(self.global_step + 1 if self.global_step else 0)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        ended = step_ended(self)
        if ended is None:
            return
        every = max(1, self.trainer.log_every_n_steps)
        if ended.number % every and ended.number != self.trainer.max_steps:
            return
        # Not read every step: Mamba-2 training is bound by the CPU enqueueing kernels, and a
        # per-step host read stalls that pipeline. Read at logging steps and before any
        # checkpoint is written (a checkpoint never holds a NaN step).
        self.raise_if_nonfinite()
        metrics = {"train/loss": ended.loss, "train/lr": ended.lr}
        if ended.grad_norm is not None:
            metrics["train/grad_norm"] = ended.grad_norm
        if self.train_step.nonfinite.policy == "skip":
            metrics["train/skipped_steps"] = self.train_step.nonfinite.skipped
        log_metrics(self.trainer, metrics, step=ended.number)

    def on_train_end(self) -> None:
        self.raise_if_nonfinite()
        rank_zero_info(f"training step: {self.training_step_mode}")
        self.train_step.release()

    def raise_if_nonfinite(self) -> None:
        ckpt_cb = self.trainer.checkpoint_callback if self._trainer is not None else None
        self.train_step.nonfinite.poll(getattr(ckpt_cb, "last_model_path", None) or None)

    @property
    def graph_step(self):
        """The captured forward/backward (``cuda_graph.GraphedTrainStep``), or None: eager."""
        return self.train_step.graph

    @property
    def training_step_mode(self) -> str:
        """How training steps ran: captured in a CUDA graph or eager, and why (summary.json)."""
        return self.train_step.describe()

    @property
    def skipped_steps(self) -> int:
        """Optimizer steps skipped for non-finite loss/gradients (reads the device: a sync)."""
        self.train_step.nonfinite.poll_counts()
        return self.train_step.nonfinite.skipped

    # ------------------------------------------------------------------ validation
    def on_validation_epoch_start(self) -> None:
        self._val_sum, self._val_tokens = None, 0

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        n = batch["input_ids"].numel()
        loss = self._loss(batch).detach().float() * n
        self._val_sum = loss if self._val_sum is None else self._val_sum + loss
        self._val_tokens += n

    def on_validation_epoch_end(self) -> None:
        """``val/loss`` (token-weighted over all ranks) and ``val/ppl``, logged at the step
        they follow: the same step number as the training metrics and the checkpoint."""
        if self._val_sum is None:
            return
        totals = torch.stack([self._val_sum, torch.tensor(float(self._val_tokens), device=self._val_sum.device)])
        if self.trainer.world_size > 1:
            totals = self.trainer.strategy.reduce(totals, reduce_op="sum")
        val_loss = totals[0] / totals[1]
        ppl = torch.exp(val_loss.clamp(max=30))
        # for callbacks (progress); equal on every rank already, sync_dist keeps Lightning quiet
        self.log("val/loss", val_loss, prog_bar=True, logger=False, sync_dist=True)
        self.log("val/ppl", ppl, logger=False, sync_dist=True)
        if not self.trainer.sanity_checking:
            log_metrics(self.trainer, {"val/loss": val_loss, "val/ppl": ppl}, step=self.global_step)

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        optimizer = build_optimizer(self.model, self.optimizer_factory, self.weight_decay)
        if self.scheduler_factory is None:
            return optimizer
        total = self.trainer.max_steps
        if total is None or total < 0:
            raise ValueError("trainer.max_steps must be set: the LR schedule is defined over steps")
        scheduler = self.scheduler_factory(optimizer, total_steps=total)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self.raise_if_nonfinite()  # never write the weights of a NaN step
        for logger in self.loggers:  # the metrics up to here are on disk before the checkpoint
            logger.save()
        checkpoint[CKPT_CONFIG_KEY] = self.model_config.to_dict()
        if self.run_config is not None:
            checkpoint[RUN_CONFIG_KEY] = self.run_config
        checkpoint[RNG_KEY] = {
            "python": random.getstate(),
            # plain lists: Lightning loads checkpoints with weights_only=True (no numpy arrays)
            "numpy": _numpy_state_to_plain(np.random.get_state()),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint.get(CKPT_CONFIG_KEY)
        # compared as saved (to_dict); the kernels block is not part of the model and may differ
        now = self.model_config.to_dict()
        saved = MambaLMConfig.from_dict(saved).to_dict() if saved is not None else now
        if saved != now:
            diff = "; ".join(f"model.{k}: {saved.get(k)!r} in the checkpoint, {now.get(k)!r} now"
                             for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k))
            raise ConfigError(
                f"the checkpoint was written for a different model config than the one "
                f"configured now ({diff}); resume with the same model.* settings (or start a new "
                "run: run_name=<new name>, init_from=<this checkpoint> for its weights)")
        rng = checkpoint.get(RNG_KEY)
        if rng:
            random.setstate(rng["python"])
            name, keys, pos, has_gauss, cached = rng["numpy"]
            np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
            torch.set_rng_state(rng["torch"])
            if rng["cuda"] is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])


def _numpy_state_to_plain(state: tuple) -> tuple:
    name, keys, pos, has_gauss, cached = state
    return name, keys.tolist(), int(pos), int(has_gauss), float(cached)
