"""The training task: composed config in, trained run out.

``python -m mamba_train`` (``cli/train.py``) only hands Hydra's config to ``train(cfg)``, which
reads top to bottom: validate -> data -> module (one instantiate of the ``module`` group) ->
callbacks/loggers -> trainer -> batch arithmetic -> fit. Tests call ``train`` directly with a composed config.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ProgressBar
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from mamba_train.config_checks import (check_config, check_interpolations, config_warnings,
                                       max_steps, write_resolved_config)
from mamba_train.errors import MambaTrainError, instantiate_config
from mamba_train.training.step.batch import BatchSizeError, grad_accumulation, planned_world_size
from mamba_train.training.run.callbacks.run_start import check_model_memory
from mamba_train.training.run.checkpoint_io import AtomicCheckpointIO
from mamba_train.training.run.determinism import enable_deterministic_kernels
from mamba_train.training.run.init_from import model_and_source
from mamba_train.training.step.module import MambaLMModule
from mamba_train.training.run.resume import (checkpoint_dir, checkpoint_files, clean_checkpoint_dir,
                                         resolve_ckpt_path, resume_command)
from mamba_train.training.run.run_lock import launching_rank_zero, lock_run_dir, unlock_run_dir

log = logging.getLogger(__name__)


class RunDirError(MambaTrainError, RuntimeError):
    pass


class TrainerConfigError(MambaTrainError, ValueError):
    """A trainer.* / strategy.* value Lightning refuses (a device this machine lacks, an option
    its strategy does not take)."""


@contextmanager
def _lightning_refusals(keys: str):
    from hydra.errors import InstantiationException
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    try:
        yield
    except MambaTrainError:
        raise
    except (MisconfigurationException, InstantiationException, TypeError, ValueError, ImportError) as e:
        cause = e.__cause__ if isinstance(e, InstantiationException) and e.__cause__ else e
        text = " ".join(str(cause).split())
        raise TrainerConfigError(f"Lightning refused {keys}: {text}") from e


def resolve_precision(precision: str) -> str:
    if precision == "auto":
        return "bf16-mixed" if torch.cuda.is_available() else "32-true"
    return precision


def _instantiate_dict(cfg: DictConfig | None) -> list[Any]:
    """Instantiate every non-null entry of a {name: {_target_: ...}} group (callbacks, loggers)."""
    if not cfg:
        return []
    return [instantiate(v) for v in cfg.values() if v is not None and "_target_" in v]


def _strategy(cfg: DictConfig):
    if "_target_" not in cfg:
        return cfg.get("name", "auto")
    return instantiate_config(cfg)


def _fused_gpu_sm_count(backend: str) -> int | None:
    """The GPU's multiprocessor count when the fused kernels will likely run, else None. Only
    finds mamba_ssm, does not import it: the deterministic mode must be set before that."""
    import importlib.util

    if backend == "reference" or not torch.cuda.is_available() or not importlib.util.find_spec("mamba_ssm"):
        return None
    return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count


def _check_run_dir(run_dir: Path, ckpt_dir: Path, ckpt_path: str | None) -> None:
    """Never silently train over an existing run's checkpoints."""
    existing = sorted(checkpoint_files(ckpt_dir))
    if existing and ckpt_path is None:
        raise RunDirError(
            f"{run_dir} already holds checkpoints ({existing[-1].name}, ...). Resume with "
            "ckpt_path=last, or start a new run with run_name=<new name>."
        )


def batching(cfg: DictConfig) -> tuple[int, int]:
    """(world size, gradient accumulation) of this config: Lightning counts micro-batches (its
    accumulation window, its validation cadence); the config speaks in optimizer steps of a
    global batch, which needs the world size first."""
    with _lightning_refusals(f"trainer.accelerator={cfg.trainer.accelerator} "
                             f"trainer.devices={cfg.trainer.devices} trainer.num_nodes={cfg.trainer.num_nodes}"):
        world_size = planned_world_size(cfg.trainer.accelerator, cfg.trainer.devices, cfg.trainer.num_nodes)
    # the ranks of a context-parallel group (strategy=fsdp2) share their windows: count
    # data-parallel ranks
    cp = int(cfg.strategy.get("context_parallel_size", 1) or 1)
    if world_size % cp:
        raise BatchSizeError(f"strategy.context_parallel_size={cp} does not divide the world size "
                             f"{world_size} (trainer.devices x trainer.num_nodes); pick a divisor")
    return world_size, grad_accumulation(cfg.train.global_batch_tokens, cfg.data.micro_batch_size,
                                          cfg.data.seq_len, world_size // cp)


def check_before_writing(cfg: DictConfig) -> None:
    """What the config and the run directory decide alone, before anything is written (the CLI
    runs this before Hydra writes .hydra/ into the run directory; train() again)."""
    check_interpolations(cfg)  # an unset ${oc.env:...} is one line naming its key
    check_config(cfg)  # every bad value in one line, before anything is built or written
    _check_run_dir(Path(cfg.run_dir), checkpoint_dir(cfg), cfg.ckpt_path)
    batching(cfg)


def train(cfg: DictConfig, extra_callbacks: list[L.Callback] | None = None) -> dict[str, Any]:
    """Train as configured; ``extra_callbacks`` (benchmarks, tests) join the configured ones."""
    check_before_writing(cfg)
    run_dir = Path(cfg.run_dir)
    lock_run_dir(run_dir)  # a second run in the same directory refuses here
    ckpt_dir = checkpoint_dir(cfg)  # callbacks.model_checkpoint.dirpath, wherever it points
    _check_run_dir(run_dir, ckpt_dir, cfg.ckpt_path)
    ckpt_path = resolve_ckpt_path(ckpt_dir, cfg.ckpt_path)  # newest that loads
    if cfg.trainer.get("deterministic"):
        enable_deterministic_kernels()  # before any mamba_ssm kernel is imported or tuned
    # the model group's config, or init_from=<source>'s (continued pretraining); a model that
    # cannot be built refuses before the run directory's record (config, checkpoints) is touched
    model_config, init_from = model_and_source(cfg, resuming=ckpt_path is not None)
    check_model_memory(model_config)  # a mistyped size refuses now, not after minutes of allocation
    if launching_rank_zero():
        clean_checkpoint_dir(ckpt_dir, int(cfg.train.keep_last_k_checkpoints),
                             keep=ckpt_path)
        log.info("resolved config: %s", write_resolved_config(cfg, run_dir))
        for warning in config_warnings(cfg, sm_count=_fused_gpu_sm_count(cfg.backend)):
            log.warning(warning)
    L.seed_everything(cfg.seed, workers=True)

    # with init_from the vocabulary is checked against the source instead (module setup)
    datamodule = instantiate_config(cfg.data,
                                    expected_vocab_size=None if init_from else model_config.vocab_size)
    datamodule.check_paths()  # a missing data directory refuses before any logger starts a run
    source = {"model_config": model_config.to_dict(), "init_from": init_from} if init_from else {}
    module: MambaLMModule = instantiate_config(cfg.module, run_config=OmegaConf.to_yaml(cfg, resolve=True),
                                         **source)

    callbacks = _instantiate_dict(cfg.get("callbacks")) + list(extra_callbacks or [])
    # callbacks.progress_bar=null means no progress display, not Lightning's default (epoch) bar
    bar = {} if "enable_progress_bar" in cfg.trainer else {
        "enable_progress_bar": any(isinstance(cb, ProgressBar) for cb in callbacks)}
    loggers = _instantiate_dict(cfg.get("logger"))
    world_size, accum = batching(cfg)
    # _partial_: the callback/logger objects go to the Trainer directly, not through OmegaConf
    # (which would try to wrap them as config nodes).
    with _lightning_refusals("the trainer.* / strategy.* settings"):
        trainer: L.Trainer = instantiate(cfg.trainer, _partial_=True)(
            default_root_dir=str(run_dir),
            max_steps=max_steps(cfg),
            precision=resolve_precision(cfg.trainer.precision),
            strategy=_strategy(cfg.strategy),
            callbacks=callbacks,
            **bar,
            logger=loggers or False,
            plugins=[AtomicCheckpointIO(), *_instantiate_dict((cfg.get("cluster") or {}).get("plugins"))],
            check_val_every_n_epoch=None,
            accumulate_grad_batches=accum,
            val_check_interval=int(cfg.train.val_every_n_steps) * accum,
        )
    if trainer.world_size != world_size:
        raise BatchSizeError(f"the Trainer runs {trainer.world_size} processes, not the {world_size} "
                             "that trainer.accelerator/devices/num_nodes give; set them explicitly")

    if trainer.is_global_zero:
        log.info("run dir: %s | world size %d | micro-batch %d × %d tokens | accumulation %d | "
                 "%d tokens/step | %d steps | backend %s", run_dir, trainer.world_size,
                 cfg.data.micro_batch_size, cfg.data.seq_len, accum,
                 cfg.train.global_batch_tokens, trainer.max_steps, cfg.backend)

    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)

    ckpt_cb = trainer.checkpoint_callback
    last = getattr(ckpt_cb, "last_model_path", "") or ""
    stopped = next((cb for cb in callbacks if getattr(cb, "stopped_by", None) is not None), None)
    exit_code = 0
    if stopped is not None:  # SIGTERM/SIGINT/SIGUSR1: saved at a step boundary, then stopped
        # 128 + signal, as a shell reports a signal's death; 0 where the job requeued itself
        last, exit_code = stopped.saved_path, 0 if stopped.requeue else 128 + int(stopped.stopped_by)
        if trainer.is_global_zero:
            print(f"stopped by {stopped.stopped_by.name} after step {stopped.saved_step}; saved "
                  f"{last}; resume with: {resume_command()}", flush=True)
    elif trainer.is_global_zero:
        print(f"training done: {trainer.global_step} steps; last checkpoint: {last or '(none)'}")
    unlock_run_dir(run_dir)
    return {"trainer": trainer, "module": module, "datamodule": datamodule,
            "run_dir": run_dir, "last_checkpoint": last, "exit_code": exit_code,
            "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()}}
