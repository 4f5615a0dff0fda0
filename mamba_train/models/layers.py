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
    """SwiGLU MLP: ``fc2(a * silu(g))`` with ``[a, g] = fc1(x)`` (mamba_ssm's ``GatedMLP``).

    ``gate_multiplier`` / ``down_multiplier``: Falcon-H1's µP constants,
    ``fc2(a * silu(g * gate_multiplier)) * down_multiplier``."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None,
                 bias: bool = False, multiple_of: int = 128, gate_multiplier: float = 1.0,
                 down_multiplier: float = 1.0, device=None, dtype=None):
        super().__init__()
        out_features = out_features or in_features
        # mamba_ssm rounds the hidden width up to a multiple of 128
        hidden_features = (hidden_features + multiple_of - 1) // multiple_of * multiple_of
        self.gate_multiplier, self.down_multiplier = gate_multiplier, down_multiplier
        self.fc1 = nn.Linear(in_features, 2 * hidden_features, bias=bias, device=device, dtype=dtype)
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, gate = self.fc1(x).chunk(2, dim=-1)
        if self.gate_multiplier != 1:
            gate = gate * self.gate_multiplier
        out = self.fc2(y * F.silu(gate))
        return out * self.down_multiplier if self.down_multiplier != 1 else out


class SquaredReLUMLP(nn.Module):
    """``fc2(relu(fc1(x))**2)``: Nemotron-H's MLP (squared ReLU, So et al. 2021, "Primer")."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None,
                 bias: bool = False, multiple_of: int = 128, down_multiplier: float = 1.0,
                 device=None, dtype=None):
        super().__init__()
        hidden_features = (hidden_features + multiple_of - 1) // multiple_of * multiple_of
        self.down_multiplier = down_multiplier
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias, device=device, dtype=dtype)
        self.fc2 = nn.Linear(hidden_features, out_features or in_features, bias=bias,
                             device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fc2(torch.square(F.relu(self.fc1(x))))
        return out * self.down_multiplier if self.down_multiplier != 1 else out


def make_mlp(d_model: int, width: int, act: str = "swiglu", bias: bool = False,
             multiple_of: int = 128, gate_multiplier: float = 1.0, down_multiplier: float = 1.0,
             device=None, dtype=None) -> nn.Module:
    """The MLP sublayer of ``mlp_cfg`` (``models/pattern.py``)."""
    factory = dict(bias=bias, multiple_of=multiple_of, down_multiplier=down_multiplier,
                   device=device, dtype=dtype)
    if act == "relu2":
        if gate_multiplier != 1:
            raise ValueError("multipliers.mlp_gate needs a gated MLP (mlp_cfg.act=swiglu)")
        return SquaredReLUMLP(d_model, width, d_model, **factory)
    return GatedMLP(d_model, width, d_model, gate_multiplier=gate_multiplier, **factory)


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


class SectionScaledLinear(nn.Linear):
    """An ``nn.Linear`` whose output sections are multiplied by constants: Falcon-H1's
    ``mup_vector`` on the Mamba-2 in_proj (z, x, B, C, dt). Same parameters, same names."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        # filled on the device each call: no buffer to materialise, nothing to copy from the host
        scale = torch.cat([torch.full((n,), v, device=out.device, dtype=out.dtype)
                           for n, v in self.sections])
        return out * scale

    def extra_repr(self) -> str:
        return super().extra_repr() + f", sections={self.sections}"


def scale_in_proj_sections(mixer: nn.Module, multipliers) -> None:
    """Make a Mamba-2 mixer's in_proj a :class:`SectionScaledLinear` scaling z, x, B, C and dt
    by ``multipliers`` (the mixer must have no gated-MLP part in its in_proj)."""
    sizes = [mixer.d_ssm, mixer.d_ssm, mixer.ngroups * mixer.d_state,
             mixer.ngroups * mixer.d_state, mixer.nheads]
    if sum(sizes) != mixer.in_proj.out_features:
        raise ValueError("multipliers.ssm_zxbcdt needs a Mamba-2 in_proj of [z, x, B, C, dt] "
                         "only (ssm_cfg.d_ssm unset)")
    proj = mixer.in_proj
    proj.__class__ = SectionScaledLinear  # same parameters and state-dict names
    proj.sections = tuple(zip(sizes, (float(v) for v in multipliers)))
