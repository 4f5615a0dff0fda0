"""Reference Mamba-1 mixer: ``mamba_ssm.modules.mamba_simple.Mamba`` in pure PyTorch.

Same constructor arguments, parameter names, shapes, dtypes and initial distributions as
``mamba_ssm`` 2.3.2, so state dicts move between the two unchanged. The forward is mamba_ssm's
non-fused path (in_proj -> causal conv + SiLU -> x_proj -> dt_proj -> selective scan -> out_proj),
with the scan vectorised over chunks of tokens (``reference.selective_scan``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mamba_train.models.init import DeltaProjection, SSMInitSpec, init_ssm_parameters_
from mamba_train.models.layers import RMSNorm
from mamba_train.models.reference.selective_scan import selective_scan
from mamba_train.models.state_passing import SequenceCarry, carried_causal_conv1d


class Mamba(nn.Module):
    """Mamba-1 selective-SSM mixer, (batch, seqlen, d_model) -> (batch, seqlen, d_model).

    Parameters (as mamba_ssm): ``in_proj`` (2*d_inner, d_model), ``conv1d`` depthwise
    (d_inner, 1, d_conv), ``x_proj`` (dt_rank + 2*d_state, d_inner), ``dt_proj`` (a
    ``DeltaProjection``: weight (d_inner, dt_rank), bias (d_inner,)), ``A_log`` (d_inner, d_state)
    and ``D`` (d_inner,) kept in fp32, ``out_proj`` (d_model, d_inner).
    ``use_fast_path`` is accepted and ignored (there is only the reference path here).
    ``dt_bc_norm``: Jamba's RMS norms (``dt_norm``, ``B_norm``, ``C_norm``, eps ``norm_eps``) on
    the three parts of ``x_proj``'s output, before ``dt_proj`` and the scan (:func:`split_x_proj`).
    ``sequence_carry``: set by ``mamba_train.parallel`` when each rank holds a slice of the
    sequence (``models/state_passing.py``); None runs whole sequences.
    """

    sequence_carry: SequenceCarry | None = None

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: float = 2,
        dt_rank="auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init: str = "random",
        dt_scale: float = 1.0,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
        use_fast_path: bool = True,
        dt_bc_norm: bool = False,
        norm_eps: float = 1e-5,
        layer_idx: int | None = None,
        device=None,
        dtype=None,
    ):
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        if dt_init not in ("random", "constant"):
            raise ValueError(f"dt_init must be 'random' or 'constant', got {dt_init!r}")
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.expand = expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.use_fast_path = use_fast_path
        self.layer_idx = layer_idx
        self.activation = "silu"
        self.ssm_init = SSMInitSpec(
            dt_min=dt_min, dt_max=dt_max, dt_init_floor=dt_init_floor, dt_init=dt_init,
            dt_scale=dt_scale,
        )

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias, **factory_kwargs)
        self.conv1d = nn.Conv1d(
            self.d_inner, self.d_inner, kernel_size=d_conv, groups=self.d_inner,
            padding=d_conv - 1, bias=conv_bias, **factory_kwargs,
        )
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False,
                                **factory_kwargs)
        self.dt_proj = DeltaProjection(self.dt_rank, self.d_inner, self.ssm_init, **factory_kwargs)
        # A_log and D stay fp32 whatever ``dtype`` is (as in mamba_ssm)
        self.A_log = nn.Parameter(torch.empty(self.d_inner, d_state, device=device,
                                              dtype=torch.float32))
        self.D = nn.Parameter(torch.empty(self.d_inner, device=device, dtype=torch.float32))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **factory_kwargs)
        add_dt_bc_norms(self, dt_bc_norm, norm_eps, **factory_kwargs)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-draw the SSM parameters (Δ projection, A_log, D); the Linear/Conv layers reset
        themselves (PyTorch default init, which is what mamba_ssm uses)."""
        init_ssm_parameters_(self)

    def forward(self, hidden_states: torch.Tensor, seq_idx: torch.Tensor | None = None,
                inference_params=None, carry: SequenceCarry | None = None) -> torch.Tensor:
        """hidden_states: (batch, seqlen, d_model); seq_idx: optional (batch, seqlen) int32
        document numbers -- the conv window and the SSM state restart where it changes;
        carry: this is a slice of a longer sequence, joined to it through ``carry``."""
        carry = carry if carry is not None else self.sequence_carry
        if inference_params is not None:
            raise NotImplementedError("the reference Mamba mixer has no incremental decoding")
        batch, seqlen, _ = hidden_states.shape
        xz = self.in_proj(hidden_states)  # (b, l, 2*d_inner)
        x, z = xz.chunk(2, dim=-1)
        x = carried_causal_conv1d(x.transpose(1, 2), self.conv1d.weight, self.conv1d.bias,
                                  seq_idx, self.activation, carry)  # (b, d, l)
        x_dbl = self.x_proj(x.transpose(1, 2))  # (b, l, dt_rank + 2*d_state)
        dt, B, C = split_x_proj(self, x_dbl)
        dt = F.linear(dt, self.dt_proj.weight)  # the Δ bias is added inside the scan
        A = -torch.exp(self.A_log.float())
        y = selective_scan(
            x, dt.transpose(1, 2), A, B.transpose(1, 2), C.transpose(1, 2),
            D=self.D.float(), z=z.transpose(1, 2), delta_bias=self.dt_proj.bias.float(),
            delta_softplus=True, seq_idx=seq_idx, carry=carry,
        )
        return self.out_proj(y.transpose(1, 2))

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_inner={self.d_inner}, d_state={self.d_state}, "
                f"d_conv={self.d_conv}, dt_rank={self.dt_rank}")


def add_dt_bc_norms(mixer: nn.Module, enabled: bool, eps: float, device=None, dtype=None) -> None:
    """Give a Mamba-1 mixer Jamba's RMS norms on dt, B and C (``dt_norm``/``B_norm``/``C_norm``
    weights, dt_rank and d_state wide), or None for each: transformers' ``JambaMambaMixer``
    (Lieber et al. 2024, arXiv 2403.19887, added there to stabilise training at scale)."""
    factory = dict(eps=eps, device=device, dtype=dtype)
    mixer.dt_norm = RMSNorm(mixer.dt_rank, **factory) if enabled else None
    mixer.B_norm = RMSNorm(mixer.d_state, **factory) if enabled else None
    mixer.C_norm = RMSNorm(mixer.d_state, **factory) if enabled else None


def split_x_proj(mixer: nn.Module, x_dbl: torch.Tensor):
    """``x_proj``'s output (..., dt_rank + 2*d_state) -> (dt, B, C), each through its norm when
    the mixer has them (both backends call this, so they compute the same maths)."""
    dt, B, C = torch.split(x_dbl, [mixer.dt_rank, mixer.d_state, mixer.d_state], dim=-1)
    if mixer.dt_norm is not None:
        dt, B, C = mixer.dt_norm(dt), mixer.B_norm(B), mixer.C_norm(C)
    return dt, B, C
