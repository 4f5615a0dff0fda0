"""Fail fast when a trainable parameter is not fp32.

Why: the SSM recurrence multiplies exp(Δ·A) thousands of times along the sequence. With 16-bit
*parameters* (as opposed to 16-bit activations under autocast), the updates to A_log, D and the
Δ bias are rounded away and the state dynamics drift; the Mamba authors report training
instabilities from exactly this (state-spaces/mamba README "Precision", issue #6). Use
``precision=bf16-mixed`` (fp32 masters, bf16 compute), not ``bf16-true``/``16-true``.
"""

from __future__ import annotations

import logging

import lightning as L
import torch

from mamba_train.errors import MambaTrainError

log = logging.getLogger(__name__)


class LowPrecisionParametersError(MambaTrainError, RuntimeError):
    pass


def low_precision_parameters(module: torch.nn.Module) -> list[tuple[str, torch.dtype]]:
    return [(n, p.dtype) for n, p in module.named_parameters()
            if p.requires_grad and p.dtype != torch.float32]


class FP32MasterWeightsGuard(L.Callback):
    def __init__(self, allow_low_precision_params: bool = False):
        self.allow = allow_low_precision_params

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        bad = low_precision_parameters(pl_module)
        if not bad:
            return
        names = ", ".join(f"{n} ({str(d).removeprefix('torch.')})" for n, d in bad[:4])
        more = f" and {len(bad) - 4} more" if len(bad) > 4 else ""
        msg = (
            f"{len(bad)} trainable parameters are not fp32: {names}{more}. SSMs need fp32 master "
            "weights: 16-bit storage rounds away the small updates to A_log, D and the Δ bias and "
            "destabilises the recurrence. Use precision=bf16-mixed (fp32 parameters, bf16 "
            "autocast) instead of a *-true precision or a 16-bit-parameter strategy"
        )
        if not self.allow:
            raise LowPrecisionParametersError(
                msg + ", or set train.allow_low_precision_params=true to override."
            )
        log.warning("!!! %s. Continuing because train.allow_low_precision_params=true. !!!", msg)
