"""Optimizer parameter groups, decided by parameter *name*.

Parameter attributes such as mamba_ssm's ``_no_weight_decay`` do not survive FSDP2/DTensor and
PyTorch optimizers ignore them, so the rule is a function of the name alone (the names are
mamba_ssm's, identical on both backends). Following the Mamba papers: no weight decay on
A_log, D, the Δ bias, Mamba-3's B/C biases, norm weights (B/C norms included) and any bias; decay on every other weight (projections,
convolution, embedding / tied head). Groups are built in sorted-name order so a resumed
optimizer state lines up with the same parameters.
"""

from __future__ import annotations

import re
from typing import Callable

import torch
from torch import nn

_NO_DECAY = re.compile(
    r"(^|\.)(A_log|D|dt_bias|B_bias|C_bias)$"  # SSM parameters (Mamba-3's B/C biases too)
    r"|\.bias$"                          # every bias, the Mamba-1 Δ bias (dt_proj.bias) included
    r"|(^|\.)(norm|norm2|norm_f|B_norm|C_norm|dt_norm)\.weight$"  # block/MLP/final, gated, dt/B/C
)


def no_weight_decay(name: str) -> bool:
    return bool(_NO_DECAY.search(name))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups (decay / no decay); every trainable parameter in exactly one of them."""
    seen: dict[int, str] = {}
    decay, no_decay = [], []
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if not p.requires_grad or id(p) in seen:  # tied weights appear once
            continue
        seen[id(p)] = name
        (no_decay if no_weight_decay(name) else decay).append((name, p))
    groups = [
        {"params": [p for _, p in decay], "param_names": [n for n, _ in decay],
         "weight_decay": weight_decay},
        {"params": [p for _, p in no_decay], "param_names": [n for n, _ in no_decay],
         "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, optimizer: Callable[..., torch.optim.Optimizer],
                    weight_decay: float) -> torch.optim.Optimizer:
    """``optimizer`` is a partial (Hydra ``_partial_: true``) taking the param groups."""
    groups = param_groups(model, weight_decay)
    try:
        return optimizer(groups)
    except TypeError:  # optimizers that reject the informational "param_names" key
        return optimizer([{k: v for k, v in g.items() if k != "param_names"} for g in groups])

