"""Data/model parallelism in one place: the strategies, their precision policy, model construction
under partitioned init, and gathering sharded parameters for whole-model checks.

Strategies (``strategy=<name>``, files in ``conf/strategy/``):

* ``ddp``: Lightning's ``DDPStrategy``; fp32 parameters, bf16 autocast under ``bf16-mixed``.
* ``fsdp``: :func:`fsdp_strategy` -- FSDP (``FullyShardedDataParallel``) wrapping each Mamba
  :class:`~mamba_train.models.lm.Block`, ``use_orig_params=True`` (so the optimizer groups go by
  parameter *name*, ``training/optim.py``), optional per-block activation checkpointing, full or
  sharded checkpoints.
* ``deepspeed_zero{1,2,3}``: :func:`deepspeed_strategy` -- DeepSpeed ZeRO through Lightning.

Precision policy (the same numerics under every strategy): parameters, gradients and optimizer
state stay **fp32**; under ``precision=bf16-mixed`` the forward/backward run under bf16 autocast
(matmuls and convolutions in bf16, the SSM parameters A_log, D and the Δ bias used in fp32). Two
strategies would otherwise keep 16-bit *parameters* for compute:

* FSDP ``MixedPrecision(param_dtype=bf16)`` (Lightning's default for ``bf16-mixed``) keeps fp32
  *sharded masters* -- so the optimizer updates are not rounded away, the failure of 16-bit
  storage (state-spaces/mamba#6) -- but all-gathers a bf16 copy for compute. That rounds A_log,
  D and the Δ bias to 8 significant bits in every forward (A and Δ off by up to ~1-2% at their
  initial values; updates smaller than a bf16 step are invisible to the forward until they add
  up) and the gradients come out in bf16. FSDP1 casts whole units (a Block), so the SSM
  parameters cannot be exempted. Autocast already runs the matmuls in bf16, so what 16-bit
  parameters would buy is only a halved all-gather; here ``param_dtype``/``reduce_dtype``
  default to fp32 and ``param_dtype=bfloat16`` is refused unless
  ``train.allow_low_precision_params=true``.
* DeepSpeed's ``bf16`` mode casts the whole module to bf16 (fp32 copies only inside the ZeRO
  optimizer), so every forward uses bf16 A_log/D/Δ bias. Instead, ``bf16-mixed`` here turns on
  DeepSpeed's ``torch_autocast`` mode: fp32 module parameters, bf16 autocast in the engine's
  forward. Asking for DeepSpeed's own ``bf16``/``fp16`` sections is refused (same opt-out).

The init guard (``callbacks/init_guard.py``) reads the SSM parameters through
:func:`gathered_parameters`, which un-shards them where a strategy sharded them (FSDP
``summon_full_params``, DeepSpeed ``GatheredParameters``); :func:`build_model_for` builds the
model under ZeRO-3's partitioned init and re-runs the mamba_ssm init on gathered parameters
(``MambaLM.reset_parameters`` on partitioned, size-0 tensors would silently do nothing).
"""

from __future__ import annotations

import logging
import os
import signal as _signal
from contextlib import contextmanager, nullcontext
from typing import Any, Iterator

import torch
from torch import nn

from mamba_train.models.init import mixer_kind

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


class ParallelConfigError(ValueError):
    """A strategy setting that would break the fp32-master / SSM-precision contract, or is invalid."""


def _dtype(name: str | torch.dtype, key: str) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return _DTYPES[str(name).lower().removeprefix("torch.")]
    except KeyError:
        raise ParallelConfigError(f"{key}={name!r}: expected one of {sorted(_DTYPES)}") from None


def _refuse_low_precision(what: str, allow: bool) -> None:
    msg = (f"{what} computes with 16-bit copies of A_log, D and the Δ bias: the SSM decay rates are "
           "rounded to 8 significant bits in every forward (A and Δ off by up to ~1-2%) and small "
           "updates stay invisible until they add up. Keep fp32 parameters with bf16 autocast "
           "(precision=bf16-mixed, the default here); README 'Multi-GPU and multi-node'")
    if not allow:
        raise ParallelConfigError(msg + ". Set train.allow_low_precision_params=true to override.")
    log.warning("!!! %s. Continuing because train.allow_low_precision_params=true. !!!", msg)


# ---------------------------------------------------------------------------------------- FSDP
def fsdp_strategy(activation_checkpointing: bool = False, state_dict_type: str = "full",
                  sharding_strategy: str = "FULL_SHARD", param_dtype: str = "float32",
                  reduce_dtype: str = "float32", cpu_offload: bool = False,
                  sync_module_states: bool = True, allow_low_precision_params: bool = False,
                  **kwargs: Any):
    """Lightning ``FSDPStrategy`` for a ``MambaLM``: one FSDP unit per ``Block``.

    Args:
        activation_checkpointing: recompute each Block in the backward (saves activation memory,
            costs ~25-33% more compute; mamba_ssm's kernels already recompute inside).
        state_dict_type: ``full`` (one ``.ckpt`` file gathered on rank 0) or ``sharded`` (a
            directory per checkpoint, every rank writes its shard: fast for large models).
        sharding_strategy: ``FULL_SHARD`` (ZeRO-3-like), ``SHARD_GRAD_OP`` (ZeRO-2-like),
            ``NO_SHARD``, ``HYBRID_SHARD``.
        param_dtype, reduce_dtype: FSDP ``MixedPrecision`` compute/all-gather and gradient
            reduce-scatter dtypes; fp32 by default (bf16 compute comes from autocast). See the
            module docstring for why ``param_dtype=bfloat16`` is refused.
        sync_module_states: broadcast rank 0's freshly initialised weights to every rank.
        allow_low_precision_params: ``${train.allow_low_precision_params}``.
        kwargs: passed to ``FSDPStrategy`` (and on to ``FullyShardedDataParallel``).
    """
    from lightning.pytorch.plugins.precision import FSDPPrecision
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp import MixedPrecision

    class _ClipByNormFSDPPrecision(FSDPPrecision):
        """Gradient clipping by global norm for FSDP (Lightning's FSDPPrecision refuses it: it
        has no handle on the root module, and ``torch.nn.utils.clip_grad_norm_`` over local
        shards would be wrong). ``trainer.gradient_clip_val`` works as under DDP."""

        def __init__(self, precision, scaler=None, strategy=None):
            super().__init__(precision, scaler)
            self._strategy = strategy

        def clip_grad_by_norm(self, optimizer, clip_val, *args, **kwargs) -> None:
            self._strategy.model.clip_grad_norm_(clip_val)

    from mamba_train.models.lm import Block

    pdt, rdt = _dtype(param_dtype, "strategy.param_dtype"), _dtype(reduce_dtype, "strategy.reduce_dtype")
    if pdt != torch.float32:
        _refuse_low_precision(f"FSDP with param_dtype={param_dtype}", allow_low_precision_params)
    if state_dict_type not in ("full", "sharded"):
        raise ParallelConfigError(f"strategy.state_dict_type must be 'full' or 'sharded', got {state_dict_type!r}")
    class MambaFSDPStrategy(FSDPStrategy):
        """Lightning's FSDPStrategy, also on CPU processes over gloo (the CPU tests): Lightning
        refuses the exact ``FSDPStrategy`` type on CPU, and FSDP accepts CPU modules only with
        ``device_id=cpu`` (Lightning passes the device index, None on CPU)."""

        @property
        def precision_plugin(self) -> FSDPPrecision:
            plugin = FSDPStrategy.precision_plugin.fget(self)
            if not isinstance(plugin, _ClipByNormFSDPPrecision):
                plugin = _ClipByNormFSDPPrecision(plugin.precision, plugin.scaler, strategy=self)
                self._precision_plugin = plugin
            return plugin

        @precision_plugin.setter
        def precision_plugin(self, plugin) -> None:
            FSDPStrategy.precision_plugin.fset(self, plugin)

        def _cpu_full_state_dict(self) -> bool:
            return self.root_device.type == "cpu" and self._state_dict_type == "full"

        def _full_state_dict_context(self):
            # Lightning's context offloads to CPU, which segfaults (torch 2.13) when the flat
            # parameters already live on CPU; on CPU there is nothing to offload.
            from torch.distributed.fsdp import (FullOptimStateDictConfig, FullStateDictConfig,
                                                FullyShardedDataParallel, StateDictType)

            return FullyShardedDataParallel.state_dict_type(
                self.model, StateDictType.FULL_STATE_DICT,
                FullStateDictConfig(offload_to_cpu=False, rank0_only=True),
                FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=True))

        def lightning_module_state_dict(self):
            if not self._cpu_full_state_dict():
                return super().lightning_module_state_dict()
            with self._full_state_dict_context():
                return self.model.state_dict()

        def optimizer_state(self, optimizer):
            if not self._cpu_full_state_dict():
                return super().optimizer_state(optimizer)
            from torch.distributed.fsdp import FullyShardedDataParallel, OptimStateKeyType

            optimizer = getattr(optimizer, "_optimizer", optimizer)  # LightningOptimizer
            with self._full_state_dict_context():
                state = FullyShardedDataParallel.optim_state_dict(self.model, optimizer)
                if self.global_rank == 0:  # the standard (param id) format, as Lightning saves it
                    state = FullyShardedDataParallel.rekey_optim_state_dict(
                        state, OptimStateKeyType.PARAM_ID, self.model)
                return state

        def _setup_model(self, model: nn.Module) -> nn.Module:
            if self.root_device.type != "cpu":
                return super()._setup_model(model)
            from lightning.fabric.strategies.fsdp import _setup_activation_checkpointing
            from torch.distributed.fsdp import FullyShardedDataParallel

            if not any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
                kwargs = dict(self.kwargs)
                if kwargs.pop("sync_module_states", False):  # FSDP does it on GPUs only
                    with torch.no_grad():
                        for t in [*model.parameters(), *model.buffers()]:
                            torch.distributed.broadcast(t.data, src=0)
                model = FullyShardedDataParallel(
                    module=model, cpu_offload=self.cpu_offload,
                    mixed_precision=self.mixed_precision_config,
                    sharding_strategy=self.sharding_strategy, device_id=self.root_device,
                    **kwargs)
            _setup_activation_checkpointing(model, self._activation_checkpointing_kwargs)
            return model

    return MambaFSDPStrategy(
        auto_wrap_policy={Block},
        activation_checkpointing_policy={Block} if activation_checkpointing else None,
        mixed_precision=MixedPrecision(param_dtype=pdt, reduce_dtype=rdt, buffer_dtype=torch.float32),
        sharding_strategy=sharding_strategy,
        state_dict_type=state_dict_type,
        cpu_offload=cpu_offload,
        use_orig_params=True,
        sync_module_states=sync_module_states,
        **kwargs,
    )


# ----------------------------------------------------------------------------------- DeepSpeed
def _deepspeed_strategy_class():
    from lightning.pytorch.accelerators import CPUAccelerator
    from lightning.pytorch.strategies import DeepSpeedStrategy

    class MambaDeepSpeedStrategy(DeepSpeedStrategy):
        """DeepSpeed with fp32 module parameters: ``bf16-mixed`` becomes DeepSpeed's
        ``torch_autocast`` mode instead of its bf16 mode (which casts the module to bf16).

        ``allow_cpu`` lets the strategy run on CPU processes over gloo (DeepSpeed's CPU
        accelerator); Lightning only allows CUDA. It exists for the CPU tests.
        """

        def __init__(self, *args, reduce_dtype: str = "float32", allow_cpu: bool = False,
                     allow_low_precision_params: bool = False, **kwargs):
            super().__init__(*args, **kwargs)
            self._reduce_dtype = _dtype(reduce_dtype, "strategy.reduce_dtype")
            self._allow_cpu = allow_cpu
            self._allow_low_precision = allow_low_precision_params

        def setup_environment(self) -> None:
            if self._allow_cpu and isinstance(self.accelerator, CPUAccelerator):
                os.environ.setdefault("DS_ACCELERATOR", "cpu")
                super(DeepSpeedStrategy, self).setup_environment()  # DDPStrategy's, no CUDA check
                return
            super().setup_environment()

        def setup_distributed(self) -> None:
            if not (self._allow_cpu and isinstance(self.accelerator, CPUAccelerator)):
                return super().setup_distributed()
            from lightning.fabric.utilities.seed import reset_seed

            import deepspeed.ops

            # DeepSpeed would JIT-compile its shared-memory all-reduce for CPU here (~1 min of
            # ninja on first use); plain gloo collectives are enough for CPU runs.
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
            reset_seed()  # as Lightning's, without its check that CUDA device indices match ranks
            self.set_world_ranks()
            self._init_deepspeed_distributed()

        def _setup_model_and_optimizer(self, model, optimizer, lr_scheduler=None):
            if not (self._allow_cpu and isinstance(self.accelerator, CPUAccelerator)):
                return super()._setup_model_and_optimizer(model, optimizer, lr_scheduler)
            import argparse

            import deepspeed

            engine, ds_optimizer, _, _ = deepspeed.initialize(  # as Lightning's, CPU has no device index
                args=argparse.Namespace(device_rank=self.local_rank), config=self.config,
                model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                optimizer=optimizer, lr_scheduler=lr_scheduler, dist_init_required=False)
            return engine, ds_optimizer

        def _format_config(self) -> None:
            precision = self.precision_plugin.precision
            if any(self.config.get(k, {}).get("enabled") for k in ("bf16", "fp16")):
                _refuse_low_precision("DeepSpeed's bf16/fp16 mode (a 16-bit module)",
                                      self._allow_low_precision)
            elif precision == "bf16-mixed":
                self.config["bf16"] = {"enabled": False}  # keeps Lightning from turning it on
                self.config["torch_autocast"] = {
                    "enabled": True, "dtype": "bfloat16",
                    # modules whose gradients may be reduced in bf16; none by default (fp32 reduce)
                    "lower_precision_safe_modules": (
                        [] if self._reduce_dtype == torch.float32
                        else ["torch.nn.modules.linear.Linear", "torch.nn.modules.conv.Conv1d"]),
                }
            elif precision == "16-mixed":
                raise ParallelConfigError("DeepSpeed here supports precision=bf16-mixed or 32-true, "
                                          "not 16-mixed (fp16 needs loss scaling of 16-bit params)")
            super()._format_config()

    return MambaDeepSpeedStrategy


def deepspeed_strategy(stage: int, offload_optimizer: bool = False, offload_parameters: bool = False,
                       reduce_dtype: str = "float32", allow_low_precision_params: bool = False,
                       allow_cpu: bool = False, **kwargs: Any):
    """Lightning ``DeepSpeedStrategy`` (ZeRO ``stage`` 1, 2 or 3) with fp32 module parameters.

    ``reduce_dtype=bfloat16`` reduces the gradients of Linear/Conv1d weights in bf16 (DeepSpeed's
    ``torch_autocast`` default; the SSM parameters are never among them); fp32 by default.
    Other ``kwargs`` go to ``DeepSpeedStrategy`` (``config=`` a DeepSpeed JSON/dict, ...).
    """
    try:
        import deepspeed  # noqa: F401
    except ImportError as e:
        raise ParallelConfigError(f"strategy=deepspeed_zero{stage} needs DeepSpeed: "
                                  f"pip install deepspeed ({e})") from e
    if stage not in (1, 2, 3):
        raise ParallelConfigError(f"DeepSpeed ZeRO stage must be 1, 2 or 3, got {stage}")
    cls = _deepspeed_strategy_class()
    return cls(stage=stage, offload_optimizer=offload_optimizer,
               offload_parameters=offload_parameters, reduce_dtype=reduce_dtype,
               allow_cpu=allow_cpu, allow_low_precision_params=allow_low_precision_params, **kwargs)


def _is_zero3(strategy) -> bool:
    try:
        from lightning.pytorch.strategies import DeepSpeedStrategy
    except ImportError:  # pragma: no cover
        return False
    return isinstance(strategy, DeepSpeedStrategy) and bool(strategy.config) and strategy.zero_stage_3


def _is_fsdp(strategy) -> bool:
    from lightning.pytorch.strategies import FSDPStrategy
    return isinstance(strategy, FSDPStrategy)


# ----------------------------------------------------------------------------------- the model
def build_model_for(strategy, config, backend: str = "auto") -> nn.Module:
    """``build_model`` as the strategy needs it (called from ``configure_model``).

    * ZeRO-3: Lightning runs ``configure_model`` inside ``deepspeed.zero.Init``, which partitions
      every parameter as its module is constructed, so an init afterwards would write into empty
      shards. The modules are constructed normally (not on the meta device, which zero.Init
      cannot partition), then ``reset_parameters`` re-runs the full mamba_ssm init on gathered
      parameters (rank 0's values are kept and re-partitioned). The tied/untied LM head weight
      is used inside ``MambaLM.forward`` (chunked loss) rather than by calling ``lm_head``, so
      it is registered as an external parameter of the model.
    * everything else: the usual meta build + ``to_empty`` + init (FSDP shards it afterwards,
      with ``sync_module_states`` making rank 0's init everyone's).
    """
    from mamba_train.models.build import build_model
    from mamba_train.models.lm import MambaLM

    if not _is_zero3(strategy):
        return build_model(config, backend=backend)
    import deepspeed

    # Construction runs PyTorch's default inits (wasted, overwritten below); undo their RNG use
    # so the init draws are the same as build_model's (same seed -> same model on any strategy).
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        model = MambaLM(config, backend=backend)
    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0):
        model.reset_parameters()
    deepspeed.zero.register_external_parameter(model, model.lm_head.weight)
    return model


def ssm_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that ``check_ssm_init`` reads: A_log, D, Δ bias (and the Mamba-1 Δ weight)."""
    params: list[nn.Parameter] = []
    for module in model.modules():
        kind = mixer_kind(module)
        if kind is None:
            continue
        params += [module.A_log, module.D]
        params += [module.dt_proj.weight, module.dt_proj.bias] if kind == "mamba1" else [module.dt_bias]
    return params


@contextmanager
def gathered_parameters(strategy, module: nn.Module,
                        params: list[nn.Parameter] | None = None) -> Iterator[nn.Module]:
    """Read-only full (un-sharded) parameters of ``module`` on every rank inside the block.

    FSDP: ``summon_full_params`` on the root FSDP module (every parameter; offloaded to CPU on
    GPUs, so no GPU memory is needed). DeepSpeed ZeRO-3: ``GatheredParameters`` of ``params``
    (default: all of ``module``'s). Other strategies: nothing to do. A collective: every rank
    must enter it.
    """
    if strategy is not None and _is_fsdp(strategy) and strategy.model is not None:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        root = strategy.model
        if isinstance(root, FSDP):
            offload = strategy.root_device.type == "cuda"
            with FSDP.summon_full_params(root, writeback=False, offload_to_cpu=offload):
                yield module
            return
    if strategy is not None and _is_zero3(strategy):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params if params is not None else list(module.parameters()),
                                               modifier_rank=None):
            yield module
        return
    with nullcontext():
        yield module


# ------------------------------------------------------------------------------------- clusters
def slurm_environment(auto_requeue: bool = True, requeue_signal: str = "SIGUSR1"):
    """Lightning's ``SLURMEnvironment`` from config strings (``requeue_signal: SIGUSR1``)."""
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    return SLURMEnvironment(auto_requeue=auto_requeue, requeue_signal=parse_signal(requeue_signal))


def parse_signal(name: str | int) -> _signal.Signals:
    if isinstance(name, int):
        return _signal.Signals(name)
    key = str(name).upper()
    key = key if key.startswith("SIG") else f"SIG{key}"
    try:
        return _signal.Signals[key]
    except KeyError:
        raise ParallelConfigError(f"unknown signal {name!r}") from None
