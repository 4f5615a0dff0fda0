"""What the console shows: one line per message, no third-party noise, kernel caches that persist.

Called by the command-line entries (``mamba-train`` and friends) before any heavy import, and
again once Lightning is imported (:func:`quiet_third_party`); library users calling
``mamba_train.train.train`` directly keep their own logging setup.

**One line per message.** ``import lightning`` (2.x, ``lightning/__init__.py``) puts its own
``StreamHandler`` ("INFO: ...") on the ``lightning`` logger while leaving it propagating to the
root logger, where Hydra's job logging has its console handler: every Lightning message printed
twice. Removing Lightning's handler (and letting its records propagate) leaves Hydra's handler,
which also writes them to the run's log file.

**One console for all ranks.** Every rank of a multi-process run writes the same run
information, step lines and warnings; only the process of global rank 0 prints them. The other
ranks print their errors only and keep every line in their own log file
(``<run dir>/train_ddp_process_<rank>.log`` for Lightning's launcher, the run's log otherwise):
see :func:`console_errors_only`.

**Noise filtered at its source** (each filter names the message and the versions that emit it;
a filter that matches nothing costs nothing when a version stops emitting it).
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from pathlib import Path

# (logger name, message start): INFO/WARNING lines that say nothing about this run.
_NOISE = (
    # lightning 2.5-2.6 (trainer/connectors/callback_connector.py): advert for litlogger / litmodels
    ("lightning.pytorch", "💡 Tip:"),
    # lightning 2.x (trainer/connectors/data_connector.py / setup.py): restates limit_val_batches=1.0
    ("lightning.pytorch", "`Trainer(limit_"),
    # lightning 2.x (fabric/utilities/throughput.py): the peak-FLOPs table has no entry for the
    # device (e.g. "FLOPs not found for 'NVIDIA H200'"); MFU then needs callbacks.throughput.peak_flops, which
    # the project's own model summary says once
    ("lightning.fabric", "FLOPs not found"),
    # lightning 2.x (trainer/setup.py): "TPU available: False, using: 0 TPU cores" (and HPU) --
    # the GPU line before it says what runs
    ("lightning.pytorch", "TPU available"),
    ("lightning.pytorch", "HPU available"),
    # lm-eval 0.4.x (api/task.py, Task.download): "<task>: Custom kwargs can be passed to
    # `--metadata` ..." for every task whose dataset comes from a function, as the packaged
    # offline tasks' must (evaluation/tasks/local_data.py: a YAML dataset path is relative to the
    # working directory, not to the task file): advice for task authors. Filtered on the logger
    # that writes it: lm-eval's CLI puts its own console handler on "lm_eval"
    ("lm_eval.api.task", r"re:\S+: Custom kwargs can be passed to `--metadata`"),
    # matplotlib >= 3.x (font_manager): "Matplotlib is building the font cache; this may take a moment."
    ("matplotlib", "Matplotlib is building the font cache"),
)

# message regexes for warnings.warn calls (Lightning's rank_zero_warn issues warnings)
_NOISE_WARNINGS = (
    # lightning 2.5-2.6 (pytorch/utilities/_pytree.py) on torch >= 2.9: "`isinstance(treespec,
    # LeafSpec)` is deprecated" -- Lightning's own call into torch.utils._pytree, nothing to fix here
    r".*LeafSpec.*is deprecated",
    # lightning 2.x (trainer/connectors/data_connector.py): "The 'train_dataloader' does not have
    # many workers" -- the token-window loader reads memory-mapped shards; data.num_workers sets it
    r"The '\w+' does not have many workers",
    # lightning 2.x (fabric/plugins/environments/slurm.py): "The `srun` command is available on
    # your system but is not used" -- on a login node or in a plain shell that is intended
    r"The `srun` command is available",
    # lightning 2.x (fabric/utilities/throughput.py), issued as a warning: see _NOISE
    r"FLOPs not found",
    # lightning 2.x (callbacks/model_checkpoint.py): "Checkpoint directory ... exists and is not
    # empty" -- said on every resume; a fresh run over existing checkpoints is refused before
    # (train._check_run_dir), so here the directory is always this run's own
    r"Checkpoint directory .* exists and is not empty",
    # lightning 2.x (loops/fit_loop.py): "The number of training batches (2) is smaller than the
    # logging interval" -- a small corpus makes short epochs, but logging counts the run's
    # optimizer steps (logger_connector), not an epoch's batches: every interval is logged
    r"The number of training batches \(\d+\) is smaller than the logging interval",
)


class _DropPrefixes(logging.Filter):
    """Drop records of logger ``scope`` (and its children) whose message starts with a prefix
    (a prefix of the form ``re:<regex>`` is matched at the start as a regular expression)."""

    def __init__(self, scope: str, prefixes: tuple[str, ...]):
        super().__init__()
        self.scope, self.prefixes = scope, prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name != self.scope and not record.name.startswith(self.scope + "."):
            return True
        message = record.getMessage()
        return not any(re.match(p[3:], message) if p.startswith("re:") else message.startswith(p)
                       for p in self.prefixes)


def quiet_third_party() -> None:
    """Remove Lightning's duplicate console handler and install the noise filters (idempotent)."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if type(handler) is logging.StreamHandler:  # Lightning's console handler, not a file
                logger.removeHandler(handler)
        logger.propagate = True
    by_logger: dict[str, list[str]] = {}
    for name, prefix in _NOISE:
        by_logger.setdefault(name, []).append(prefix)
    for name, prefixes in by_logger.items():
        _install_filter(name, tuple(prefixes))
    for message in _NOISE_WARNINGS:
        warnings.filterwarnings("ignore", message=message)


def console_errors_only() -> None:
    """For a process that is not global rank 0: its console handlers (root's, not the log files)
    pass ERROR and above only, and Python warnings become log records (they would otherwise be
    printed to stderr by every rank) that go to its log file."""
    logging.captureWarnings(True)
    for handler in logging.getLogger().handlers:
        if not isinstance(handler, logging.FileHandler) and isinstance(handler, logging.StreamHandler):
            handler.setLevel(max(handler.level, logging.ERROR))


def _install_filter(logger_name: str, prefixes: tuple[str, ...]) -> None:
    """A filter on the logger and on every root handler: records of child loggers
    (``lightning.pytorch.utilities.rank_zero``) skip their ancestors' logger filters, so the
    handlers (root's, once Hydra configured it) carry it too."""
    for target in (logging.getLogger(logger_name), *logging.getLogger().handlers):
        if not any(isinstance(f, _DropPrefixes) and f.scope == logger_name for f in target.filters):
            target.addFilter(_DropPrefixes(logger_name, prefixes))


def user_cache_dir(*parts: str) -> Path:
    """``$MAMBA_TRAIN_CACHE/...``, default ``$XDG_CACHE_HOME/mamba_train/...`` (``~/.cache``):
    stable across runs and jobs (the default corpus is cached there too)."""
    root = os.environ.get("MAMBA_TRAIN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "mamba_train")
    return Path(root, *parts)


def default_kernel_caches() -> dict[str, str]:
    """Keep Triton's compiled kernels and autotune choices between runs; returns what was set.

    * ``TRITON_CACHE_DIR``: Triton compiles each kernel specialisation once and stores the binary
      there (its own default is ``~/.triton/cache``); a stable directory under the user cache
      makes the second run of the same shapes skip compilation. Left alone when set.
    * ``TRITON_CACHE_AUTOTUNING=1``: Triton >= 3.4 also stores ``@triton.autotune`` results on
      disk (keyed by kernel source, configs and tuning key). Without it, the autotune choices of
      mamba_ssm's Triton kernels live in the process only and every run benchmarks them again.
      Left alone when set (``TRITON_CACHE_AUTOTUNING=0`` turns it off). Older Triton ignores it.
    """
    chosen: dict[str, str] = {}
    if not os.environ.get("TRITON_CACHE_DIR"):
        chosen["TRITON_CACHE_DIR"] = str(user_cache_dir("triton"))
    if "TRITON_CACHE_AUTOTUNING" not in os.environ:
        chosen["TRITON_CACHE_AUTOTUNING"] = "1"
    os.environ.update(chosen)
    return chosen
