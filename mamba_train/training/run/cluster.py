"""Cluster helpers: Lightning's SLURM environment from config strings, and signal names.

Used by ``conf/cluster/slurm.yaml`` (the requeue plugin) and the preemption callback.
"""

from __future__ import annotations

import signal as _signal

from mamba_train.errors import MambaTrainError


class ClusterConfigError(MambaTrainError, ValueError):
    """A cluster setting (e.g. a signal name) that does not exist."""


def slurm_environment(auto_requeue: bool = True, requeue_signal: str = "SIGUSR1"):
    """Lightning's ``SLURMEnvironment`` from config strings (``requeue_signal: SIGUSR1``)."""
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    return SLURMEnvironment(auto_requeue=auto_requeue, requeue_signal=parse_signal(requeue_signal))


def parse_signal(name: str | int) -> _signal.Signals:
    """``"SIGUSR1"`` / ``"usr1"`` / ``10`` -> ``signal.SIGUSR1``."""
    if isinstance(name, int):
        return _signal.Signals(name)
    key = str(name).upper()
    key = key if key.startswith("SIG") else f"SIG{key}"
    try:
        return _signal.Signals[key]
    except KeyError:
        raise ClusterConfigError(f"unknown signal {name!r}") from None
