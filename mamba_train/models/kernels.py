"""Kernel choices of the fused backend that do not change the model (the ``kernels`` config
block): same parameters, same formulas, other kernels or recomputation.

* ``ssd``: Mamba-2's SSD on mamba_ssm's fused Function (``mamba_ssm``), on the same kernels
  without recomputation in the backward (``mamba_train``, ``models/ssd.py``) or on
  flash-linear-attention's simple-GLA kernels (``fla``, ``models/ssd_fla.py``)
  (``fused.set_ssd_kernel``).
* ``mamba1_recompute``: the fused Mamba-1 backward recomputes the conv1d output and delta
  (mamba_ssm's default) or keeps them from the forward (``fused.set_mamba1_recompute``).
* ``norm_backward``: the RMSNorm backward on mamba_train's Triton kernel (``norm_backward.py``)
  or on mamba_ssm's own. mamba_train's is installed only into the mamba_ssm release it was
  tested with; elsewhere mamba_ssm's runs, and :func:`apply_kernels` says so.

:func:`apply_kernels` returns what actually runs, which the run summary records.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

SSD_KERNELS = ("mamba_ssm", "mamba_train", "fla")


def apply_kernels(model: torch.nn.Module, ssd: str, mamba1_recompute: bool,
                  norm_backward: str) -> dict[str, object]:
    """Apply the choices (checked by ``config_checks``) to a built model; returns the kernels
    that will run."""
    if getattr(model, "backend", None) != "fused":
        return {"backend": getattr(model, "backend", "reference")}  # plain PyTorch throughout
    from mamba_train.models import norm_backward as norm_kernels
    from mamba_train.models.fused import FusedMamba, set_mamba1_recompute, set_ssd_kernel

    ran: dict[str, object] = {"backend": "fused"}
    if set_ssd_kernel(model, ssd):
        ran["ssd"] = ssd
    if any(isinstance(m, FusedMamba) for m in model.modules()):
        set_mamba1_recompute(model, recompute=mamba1_recompute)
        ran["mamba1_recompute"] = bool(mamba1_recompute)
    # process-wide: mamba_ssm's call sites are patched, not this model's modules
    if norm_backward == "mamba_train" and not norm_kernels.install():
        import mamba_ssm
        log.warning("kernels.norm_backward=mamba_train is tested with mamba_ssm %s only; this "
                    "is mamba_ssm %s, so mamba_ssm's own norm backward runs",
                    norm_kernels.SUPPORTED_MAMBA_SSM, mamba_ssm.__version__)
    elif norm_backward == "mamba_ssm":
        norm_kernels.uninstall()
    ran["norm_backward"] = "mamba_train" if norm_kernels.installed() else "mamba_ssm"
    return ran
