"""The precision contract every strategy keeps: fp32 parameters, gradients and optimizer state
(bf16 compute only through autocast), and the one-line refusal when a setting would break it."""

from __future__ import annotations

import logging

from mamba_train.errors import MambaTrainError

log = logging.getLogger(__name__)


class ParallelConfigError(MambaTrainError, ValueError):
    """A strategy setting that would break the fp32-master / SSM-precision contract, or is invalid."""


def refuse_low_precision(what: str, allow: bool) -> None:
    msg = (f"{what} computes with 16-bit copies of A_log, D and the Δ bias: the SSM decay rates are "
           "rounded to 8 significant bits in every forward (A and Δ off by up to ~1-2%) and small "
           "updates stay invisible until they add up. Keep fp32 parameters with bf16 autocast "
           "(precision=bf16-mixed, the default here); README 'Multi-GPU and multi-node'")
    if not allow:
        raise ParallelConfigError(msg + ". Set train.allow_low_precision_params=true to override.")
    log.warning("!!! %s. Continuing because train.allow_low_precision_params=true. !!!", msg)
