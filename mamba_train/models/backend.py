"""Choosing between the fused ``mamba_ssm`` kernels and the pure-PyTorch reference.

Both backends build modules with the same parameter names, so a state dict moves freely between
them. ``auto`` takes ``fused`` when CUDA is available and ``mamba_ssm`` imports, else
``reference``, and logs the choice once per process.
"""

from __future__ import annotations

import functools
import logging
from typing import Callable

import torch
from torch import nn

from mamba_train.errors import MambaTrainError
from mamba_train.models.layers import add_norm_reference

log = logging.getLogger(__name__)

BACKENDS = ("auto", "fused", "reference")


class BackendError(MambaTrainError, RuntimeError):
    """The requested backend cannot run here; the message says what is missing."""


@functools.lru_cache(maxsize=None)
def fused_unavailable_reason() -> str | None:
    """None if the fused kernels can run, else a sentence naming the missing piece."""
    if not torch.cuda.is_available():
        return "CUDA is not available (the fused kernels run on NVIDIA GPUs only)"
    try:
        import mamba_ssm  # noqa: F401  (imports the selective_scan_cuda extension too)
    except ImportError as e:
        if "selective_scan_cuda" in str(e):
            return (f"mamba_ssm was built without the Mamba-1 CUDA scan ({e}); reinstall it "
                    "from source with MAMBA_KEEP_CUDA_BUILD=TRUE and --no-build-isolation")
        return (f"mamba_ssm does not import ({e}); install it with "
                "`MAMBA_KEEP_CUDA_BUILD=TRUE pip install --no-build-isolation 'mamba-ssm>=2.2.6'`")
    try:
        import causal_conv1d  # noqa: F401
    except ImportError as e:
        return (f"causal_conv1d does not import ({e}); install it with "
                "`pip install --no-build-isolation 'causal-conv1d>=1.4'`")
    return None


_announced: set[str] = set()


def resolve_backend(backend: str = "auto") -> str:
    if backend not in BACKENDS:
        raise BackendError(f"backend must be one of {BACKENDS}, got {backend!r}")
    reason = fused_unavailable_reason() if backend != "reference" else None
    if backend == "fused" and reason:
        raise BackendError(f"backend='fused' was requested but {reason}. "
                           "Use backend=reference (pure PyTorch) or backend=auto.")
    resolved = backend if backend != "auto" else ("reference" if reason else "fused")
    if backend == "auto" and resolved not in _announced:
        _announced.add(resolved)
        why = f" ({reason})" if reason else ""
        log.info("mamba_train: using the %s mixer backend%s", resolved, why)
    return resolved


def mixer_classes(backend: str) -> dict[str, type[nn.Module]]:
    """{'Mamba1': cls, 'Mamba2': cls, 'Mamba3': cls} for a resolved backend."""
    if backend == "fused":
        from mamba_train.models.fused import FusedMamba, FusedMamba2, FusedMamba3
        return {"Mamba1": FusedMamba, "Mamba2": FusedMamba2, "Mamba3": FusedMamba3}
    from mamba_train.models.reference import Mamba, Mamba2, Mamba3
    return {"Mamba1": Mamba, "Mamba2": Mamba2, "Mamba3": Mamba3}


def add_norm_fn(backend: str, fused_add_norm: bool) -> Callable:
    """The residual add + (RMS|Layer)Norm: Triton kernel on the fused backend, else PyTorch."""
    if backend == "fused" and fused_add_norm:
        from mamba_train.models.fused import add_norm_fused
        return add_norm_fused
    return add_norm_reference
