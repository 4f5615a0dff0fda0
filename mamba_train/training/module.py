"""The LightningModule: builds the model in ``configure_model``, computes the fp32 chunked loss,
groups parameters for weight decay by name, steps the LR schedule per optimizer step, and puts
the model config and RNG states into every checkpoint."""

from __future__ import annotations

import random
from typing import Any, Callable

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info

from mamba_train.formats.checkpoint import CKPT_CONFIG_KEY, RNG_KEY, RUN_CONFIG_KEY
from mamba_train.models.config import ConfigError, MambaLMConfig
from mamba_train.models.norm_backward import CHOICES as NORM_BACKWARDS
from mamba_train.training.activation_checkpointing import (apply_activation_checkpointing,
                                                          checkpointed_block_indices,
                                                          normalize_policy)
from mamba_train.training.activation_checkpointing import describe as describe_checkpointing
from mamba_train.training.cuda_graph import (ALLREDUCE_PLACES, GRAPH_MODES, GraphedTrainStep,
                                             start_graph_step)
from mamba_train.training.lightning_compat import should_accumulate
from mamba_train.training.nonfinite import NAN_POLICIES, NonFiniteGuard, NonFiniteLossError  # noqa: F401
from mamba_train.training.optim import build_optimizer


class MambaLMModule(L.LightningModule):
    def __init__(
        self,
        model_config: dict | MambaLMConfig | None = None,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., Any] | None = None,
        backend: str = "auto",
        weight_decay: float = 0.1,
        loss_chunk_size: int = 4096,
        nan_policy: str = "stop",
        run_config: str | None = None,
        cuda_graph: str = "auto",
        cuda_graph_allreduce: str = "outside",
        mamba1_recompute: bool = True,
        norm_backward: str = "mamba_train",
        init_from: Any = None,
        max_consecutive_skips: int = 10,
        activation_checkpointing: str | bool = "off",
        activation_checkpointing_k: int = 2,
        **unknown: Any,
    ):
        """``model_config`` describes the network (``self.model`` is the ``nn.Module`` built from
        it in ``configure_model``); ``optimizer`` is a partial taking the parameter groups."""
        if "model" in unknown:
            raise ConfigError("MambaLMModule takes model_config= (a MambaLMConfig or its dict), "
                              "not model=; self.model is the nn.Module built from it")
        if unknown:
            raise TypeError(f"MambaLMModule got unexpected arguments {sorted(unknown)}")
        if model_config is None or optimizer is None:
            raise TypeError("MambaLMModule needs model_config= and optimizer=")
        super().__init__()
        if nan_policy not in NAN_POLICIES:
            raise ConfigError(f"train.nan_policy must be one of {NAN_POLICIES}, got {nan_policy!r}")
        if cuda_graph not in GRAPH_MODES:
            raise ConfigError(f"module.cuda_graph must be one of {GRAPH_MODES}, got {cuda_graph!r}")
        if cuda_graph_allreduce not in ALLREDUCE_PLACES:
            raise ConfigError(f"module.cuda_graph_allreduce must be one of {ALLREDUCE_PLACES}, "
                             f"got {cuda_graph_allreduce!r}")
        if norm_backward not in NORM_BACKWARDS:
            raise ConfigError(f"train.norm_backward must be one of {NORM_BACKWARDS}, "
                              f"got {norm_backward!r}")
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
        self.nan_policy = nan_policy
        self.run_config = run_config
        self.cuda_graph = cuda_graph
        self.cuda_graph_allreduce = cuda_graph_allreduce
        self.mamba1_recompute = mamba1_recompute
        self.norm_backward = norm_backward
        self.init_from = init_from  # training/init_from.py: InitFrom, the source of a continued run
        self.loaded_weights = None  # its fingerprints once loaded (checked by the init guard)
        self.graph_step: GraphedTrainStep | None = None  # set in on_train_start when capturable
        self._eager_reason = "eager: training has not started"  # set in on_train_start
        self.model = None
        self.grad_norm: torch.Tensor | None = None  # total norm before clipping, last step
        # non-finite loss/gradients: decided on the device before each optimizer step
        self.nonfinite = NonFiniteGuard(nan_policy, max_consecutive_skips)
        self._polled_step = -1  # the optimizer step whose bookkeeping was last read

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
            from mamba_train.training.strategies.sharded import build_model_for  # strategy-aware (ZeRO-3)
            strategy = self._trainer.strategy if self._trainer is not None else None
            weights = None
            if self.init_from is not None and not self.init_from.resuming:
                weights, self.loaded_weights = self.init_from.take_state()
            self.model = build_model_for(strategy, self.model_config, backend=self.backend,
                                         weights=weights)
            if getattr(self.model, "backend", None) == "fused" and not self.mamba1_recompute:
                from mamba_train.models.fused import set_mamba1_recompute
                set_mamba1_recompute(self.model, recompute=False)
            if getattr(self.model, "backend", None) == "fused":
                from mamba_train.models import norm_backward  # process-wide: mamba_ssm's call sites
                if self.norm_backward == "mamba_train":
                    norm_backward.install()
                else:
                    norm_backward.uninstall()
            # the one place it is applied, for every strategy (before any sharding wrapper)
            if apply_activation_checkpointing(self.model, self.activation_checkpointing,
                                              self.activation_checkpointing_k):
                rank_zero_info(describe_checkpointing(self.model))

    def forward(self, input_ids, seq_idx=None, labels=None):
        return self.model(input_ids, seq_idx=seq_idx, labels=labels,
                          loss_chunk_size=self.loss_chunk_size)

    def _loss(self, batch: dict) -> torch.Tensor:
        return self(batch["input_ids"], seq_idx=batch.get("seq_idx"), labels=batch["labels"]).loss

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: dict, batch_idx: int):
        if self.graph_step is not None:  # forward + backward in one CUDA graph replay
            starts_window = batch_idx % self.trainer.accumulate_grad_batches == 0  # Lightning's rule
            loss = self.graph_step.forward_backward(batch, starts_window)
        else:
            loss = self._loss(batch)
        self.nonfinite.note_loss(loss)  # a device flag; the step's fate is decided before it
        n_tokens = batch["input_ids"].numel()
        # the step's own loss, also when it is skipped (NaN/inf then), never a stale value
        self.log("train/loss", loss, on_step=True, prog_bar=True, batch_size=n_tokens)
        if self.nan_policy == "skip":
            self.log("train/skipped_steps", self.nonfinite.skipped_total(), on_step=True)
        return loss

    @property
    def skipped_steps(self) -> int:
        """Optimizer steps skipped for non-finite loss/gradients (reads the device: a sync)."""
        self.nonfinite.poll_counts()
        return self.nonfinite.skipped

    def on_before_optimizer_step(self, optimizer) -> None:
        from lightning.pytorch.strategies import DeepSpeedStrategy
        reduce_max = None
        if self.trainer.world_size > 1 and not self._gradients_replicated():
            strategy = self.trainer.strategy
            reduce_max = lambda f: strategy.reduce(f.float(), reduce_op="sum") > 0  # noqa: E731
        # DeepSpeed's engine applies the step itself: there the flag is recorded, not applied
        deepspeed = isinstance(self.trainer.strategy, DeepSpeedStrategy)
        self.nonfinite.before_optimizer_step(optimizer, self.global_step, reduce_max,
                                             mask=not deepspeed)

    def _gradients_replicated(self) -> bool:
        """DDP (and the graph step's own all-reduce) leave every rank the same full gradients;
        sharded strategies leave each rank a shard, so the flag must be agreed."""
        from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy
        strategy = self.trainer.strategy
        return isinstance(strategy, DDPStrategy) and not isinstance(strategy, DeepSpeedStrategy)

    # ------------------------------------------------------------------ CUDA graph (see cuda_graph.py)
    def _start_graph_step(self) -> None:
        if self.graph_step is None:
            self.graph_step, self._eager_reason = start_graph_step(self.trainer, self, self.cuda_graph)

    @property
    def training_step_mode(self) -> str:
        """How training steps ran: captured in a CUDA graph or eager, and why (summary.json)."""
        return self.graph_step.describe() if self.graph_step is not None else self._eager_reason

    def backward(self, loss: torch.Tensor, *args, **kwargs) -> None:
        if self.graph_step is None:
            return super().backward(loss, *args, **kwargs)
        # the graph step already ran the backward; average over ranks before the optimizer step
        # (Lightning's own accumulation rule, so that DDP reduces exactly when it would)
        if not should_accumulate(self.trainer):
            self.graph_step.sync_gradients()

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer) -> None:
        if self.graph_step is None:
            return super().optimizer_zero_grad(epoch, batch_idx, optimizer)
        # Lightning calls this between training_step and backward: the graph step has already
        # produced this micro-batch's gradients (it zeroes and re-binds them at the start of
        # each window itself), so there is nothing to do

    def on_validation_model_zero_grad(self) -> None:
        if self.graph_step is None:
            return super().on_validation_model_zero_grad()
        self.graph_step.zero_grad()

    def _release_graph_step(self) -> None:
        if self.graph_step is not None:  # the graph's private memory pool goes with it
            rank_zero_info(f"training step: {self.graph_step.describe()}")
            self.graph_step.release()

    def on_train_start(self) -> None:
        if self.init_from is not None:
            self.init_from.check_resumed(self.trainer.ckpt_path)
        from lightning.pytorch.strategies import DeepSpeedStrategy
        if self.nan_policy == "skip" and isinstance(self.trainer.strategy, DeepSpeedStrategy):
            raise NonFiniteLossError(
                "train.nan_policy=skip cannot skip a step under DeepSpeed (its engine applies "
                "the optimizer step itself); use train.nan_policy=stop or strategy=fsdp")
        self.nonfinite.window = 2 * max(1, self.trainer.log_every_n_steps)
        self._polled_step = -1
        self._start_graph_step()
        # a restarted or resumed run redoes the steps from global_step on: drop their rows from
        # the CSV log (all of them when a run killed before its first checkpoint starts over)
        for logger in self.loggers:
            if hasattr(logger, "prune_from_step"):
                logger.prune_from_step(self.global_step)

    # ------------------------------------------------------------------ non-finite steps (nonfinite.py)
    # Not read every step: Mamba-2 training is bound by the CPU enqueueing kernels, and a
    # per-step host read stalls that pipeline. The device bookkeeping is read every log
    # interval and before any checkpoint is written (a checkpoint never holds a NaN step).
    def raise_if_nonfinite(self) -> None:
        ckpt_cb = self.trainer.checkpoint_callback if self._trainer is not None else None
        self.nonfinite.poll(getattr(ckpt_cb, "last_model_path", None) or None)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        # once per logged optimizer step, not on every micro-batch of the window after it
        step = self.global_step
        if step != self._polled_step and step % max(1, self.trainer.log_every_n_steps) == 0:
            self._polled_step = step
            self.raise_if_nonfinite()

    def on_train_end(self) -> None:
        self.raise_if_nonfinite()
        self._release_graph_step()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        loss = self._loss(batch)
        self.log("val/loss", loss, on_epoch=True, sync_dist=True, prog_bar=True,
                 batch_size=batch["input_ids"].numel())

    def on_validation_epoch_end(self) -> None:
        val_loss = self.trainer.callback_metrics.get("val/loss")
        if val_loss is not None:
            # the same value on every rank (val/loss is synced); sync_dist=True costs one scalar
            # all-reduce per validation and keeps Lightning from warning that it is unsynced
            self.log("val/ppl", torch.exp(val_loss.float().clamp(max=30)), sync_dist=True)

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

    def clips_gradients_directly(self) -> bool:
        """True where ``configure_gradient_clipping`` clips (and logs the norm) itself.

        Lightning's mixed-precision plugin refuses to clip for a fused optimizer (fused AdamW,
        the fast one on GPU) because it assumes a GradScaler. Under bf16-mixed or fp32 there is
        no scaler, so clipping the gradients directly is exact: do that on single-device/DDP.
        Sharded strategies keep Lightning's path (their norm needs a cross-rank reduction);
        DeepSpeed subclasses DDP but clips by itself.
        """
        from lightning.pytorch.strategies import (DDPStrategy, DeepSpeedStrategy,
                                                  SingleDeviceStrategy)

        trainer = self.trainer
        strategy = trainer.strategy
        plain = (isinstance(strategy, (DDPStrategy, SingleDeviceStrategy))
                 and not isinstance(strategy, DeepSpeedStrategy))
        unscaled = getattr(trainer.precision_plugin, "scaler", None) is None
        algorithm = trainer.gradient_clip_algorithm
        return bool(trainer.gradient_clip_val) and algorithm in (None, "norm") and plain and unscaled

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None,
                                    gradient_clip_algorithm=None) -> None:
        if gradient_clip_val and self.clips_gradients_directly():
            # the total norm before clipping, computed once and logged (GradNormMonitor defers)
            self.grad_norm = torch.nn.utils.clip_grad_norm_(self.parameters(), gradient_clip_val)
            self.log("train/grad_norm", self.grad_norm, on_step=True, on_epoch=False)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

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
        # compared as saved (to_dict): kernel choices such as ssm_cfg.ssd_kernel may differ
        if saved is not None and MambaLMConfig.from_dict(saved).to_dict() != self.model_config.to_dict():
            raise ValueError(
                "the checkpoint was written for a different model config than the one "
                "configured now; resume with the same model.* settings (or start a new run)"
            )
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
