"""Backend-independent layers: norms, the gated MLP and the reference add+norm.

These carry the same parameter names as their ``mamba_ssm`` counterparts (``weight``/``bias`` of
``RMSNorm``, ``fc1``/``fc2`` of ``GatedMLP``) and are used by both backends; only the add+norm
has a fused (Triton) alternative, chosen in ``models/backend.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """RMS normalisation with a learned scale; computed in (at least) fp32, returned in the input
    dtype."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden_size, device=device, dtype=dtype))
        self.register_parameter("bias", None)  # mamba_ssm's layer_norm_fn reads .bias
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        acc = torch.promote_types(x.dtype, torch.float32)  # fp32 (fp64 stays fp64)
        xf = x.to(acc)
        out = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + self.eps)
        return (out * self.weight.to(acc)).to(x.dtype)


class GatedMLP(nn.Module):
    """SwiGLU MLP: ``fc2(a * silu(g))`` with ``[a, g] = fc1(x)`` (mamba_ssm's ``GatedMLP``)."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None,
                 bias: bool = False, multiple_of: int = 128, device=None, dtype=None):
        super().__init__()
        out_features = out_features or in_features
        # mamba_ssm rounds the hidden width up to a multiple of 128
        hidden_features = (hidden_features + multiple_of - 1) // multiple_of * multiple_of
        self.fc1 = nn.Linear(in_features, 2 * hidden_features, bias=bias, device=device, dtype=dtype)
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, gate = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(y * F.silu(gate))


def make_norm(d_model: int, rms_norm: bool, eps: float, device=None, dtype=None) -> nn.Module:
    if rms_norm:
        return RMSNorm(d_model, eps=eps, device=device, dtype=dtype)
    return nn.LayerNorm(d_model, eps=eps, device=device, dtype=dtype)


def add_norm_reference(hidden: torch.Tensor, residual: torch.Tensor | None, norm: nn.Module,
                       residual_in_fp32: bool, prenorm: bool = True):
    """``residual += hidden; hidden = norm(residual)`` -- mamba_ssm's unfused Block order."""
    residual = hidden if residual is None else hidden + residual
    hidden = norm(residual.to(dtype=norm.weight.dtype))
    if residual_in_fp32:
        residual = residual.to(torch.float32)
    return (hidden, residual) if prenorm else hidden
