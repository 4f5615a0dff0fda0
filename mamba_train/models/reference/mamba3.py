"""Reference Mamba-3 mixer: ``mamba_ssm.modules.mamba3.Mamba3`` (mamba_ssm 2.3.2) in pure PyTorch.

Same constructor arguments, parameter names, shapes, dtypes and initial values, so a state dict
moves unchanged between this module, the fused one (``models/fused.py``) and mamba_ssm's. The
forward is mamba_ssm's: ``in_proj`` -> [z, x, B, C, dd_dt, dd_A, trap, angles]; A = -act(dd_A)
clamped at -A_floor; dt = softplus(dd_dt + dt_bias); RMS norms on B and C; the SISO scan
(``mamba3_ops``); optional head-wise gated output norm; ``out_proj``. No short convolution.

``A_activation`` is ours: ``"softplus"`` is mamba_ssm 2.3.2; ``"heavy_tail"`` is the activation
newer mamba_ssm uses instead (state-spaces/mamba PR #962: ``1 + x`` for x >= 0, ``1 / (1 - x)``
below, for stability at high learning rates). mamba_ssm's module ignores unknown keywords, so a
checkpoint trained with ``heavy_tail`` only reproduces in a mamba_ssm that has that change.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from mamba_train.errors import MambaTrainError
from mamba_train.models.mixer_tables import A_ACTIVATIONS
from mamba_train.models.init import SSMInitSpec, init_ssm_parameters_
from mamba_train.models.reference.mamba2 import GatedRMSNorm
from mamba_train.models.reference.mamba3_ops import mamba3_siso_chunked
from mamba_train.models.state_passing import SequenceCarry


class MimoKernelError(MambaTrainError, ImportError):
    """mamba_ssm's Mamba-3 MIMO kernels (TileLang) are not importable here (fused backend)."""


def heavy_tail(x: torch.Tensor) -> torch.Tensor:
    """x + 1 for x >= 0, 1 / (1 - x) for x < 0: positive, C1 at 0, slow decay for x -> -inf."""
    return x.clamp_min(0) + torch.reciprocal(1 - x.clamp_max(0))


class Mamba3(nn.Module):
    """Mamba-3 mixer, (batch, seqlen, d_model) -> (batch, seqlen, d_model).

    Parameters (mamba_ssm's names): ``in_proj`` (d_model -> 2*d_inner + 2*ngroups*d_state*R +
    3*nheads + n_angles, no bias), ``dt_bias`` (nheads, fp32), ``B_bias``/``C_bias``
    (nheads, R, d_state, fp32, init 1), ``B_norm``/``C_norm`` (RMS norms over d_state),
    ``mimo_x``/``mimo_z``/``mimo_o`` (nheads, R, headdim; MIMO only), ``D`` (nheads, fp32),
    ``norm`` (gated RMSNorm over heads; only with is_outproj_norm), ``out_proj``. R = mimo_rank
    (1 without MIMO). This reference runs SISO only; MIMO builds (for parameter counts and
    checkpoints) but its forward needs the fused backend.
    ``sequence_carry``: set by ``mamba_train.parallel`` when each rank holds a slice of the
    sequence (``models/state_passing.py``); None runs whole sequences.
    """

    sequence_carry: SequenceCarry | None = None

    def __init__(self, d_model: int, d_state: int = 128, expand: int = 2, headdim: int = 64,
                 ngroups: int = 1, rope_fraction: float = 0.5, dt_min: float = 0.001,
                 dt_max: float = 0.1, dt_init_floor: float = 1e-4, A_floor: float = 1e-4,
                 is_outproj_norm: bool = False, is_mimo: bool = False, mimo_rank: int = 4,
                 chunk_size: int = 64, dropout: float = 0.0, layer_idx: int | None = None,
                 n_layer: int | None = None, A_activation: str = "softplus", device=None,
                 dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        if A_activation not in A_ACTIVATIONS:
            raise ValueError(f"A_activation must be one of {A_ACTIVATIONS}, got {A_activation!r}")
        if rope_fraction not in (0.5, 1.0):
            raise ValueError(f"rope_fraction must be 0.5 or 1.0 (as mamba_ssm), got {rope_fraction}")
        self.d_model, self.d_state, self.expand, self.headdim = d_model, d_state, expand, headdim
        self.chunk_size, self.layer_idx, self.A_floor = chunk_size, layer_idx, A_floor
        self.A_activation = A_activation
        self.is_outproj_norm, self.is_mimo = is_outproj_norm, is_mimo
        self.mimo_rank = mimo_rank if is_mimo else 1
        self.d_inner = int(expand * d_model)
        if self.d_inner % headdim:
            raise ValueError(f"d_inner={self.d_inner} must be divisible by headdim={headdim}")
        self.nheads = self.d_inner // headdim
        self.num_bc_heads = ngroups
        if self.nheads % ngroups:
            raise ValueError(f"nheads={self.nheads} must be divisible by ngroups={ngroups}")
        self.rotary_dim_divisor = int(2 / rope_fraction)
        self.split_tensor_size = int(d_state * rope_fraction) // 2 * 2
        self.num_rope_angles = self.split_tensor_size // 2
        if self.num_rope_angles <= 0:
            raise ValueError(f"d_state={d_state} too small for any RoPE angle")
        self.ssm_init = SSMInitSpec(dt_min=dt_min, dt_max=dt_max, dt_init_floor=dt_init_floor)

        bc = self.d_state * self.num_bc_heads * self.mimo_rank
        # Order: [z, x, B, C, dd_dt, dd_A, trap, angle]
        self.split_sizes = [self.d_inner, self.d_inner, bc, bc, self.nheads, self.nheads,
                            self.nheads, self.num_rope_angles]
        self.in_proj = nn.Linear(d_model, sum(self.split_sizes), bias=False, **factory)
        f32 = {"device": device, "dtype": torch.float32}
        self.dt_bias = nn.Parameter(torch.empty(self.nheads, **f32))
        self.B_bias = nn.Parameter(torch.empty(self.nheads, self.mimo_rank, d_state, **f32))
        self.C_bias = nn.Parameter(torch.empty(self.nheads, self.mimo_rank, d_state, **f32))
        self.B_norm = GatedRMSNorm(d_state, eps=1e-5, **factory)
        self.C_norm = GatedRMSNorm(d_state, eps=1e-5, **factory)
        if is_mimo:
            for name in ("mimo_x", "mimo_z", "mimo_o"):
                setattr(self, name, nn.Parameter(
                    torch.empty(self.nheads, self.mimo_rank, headdim, **f32)))
        self.D = nn.Parameter(torch.empty(self.nheads, **f32))
        if is_outproj_norm:
            self.norm = GatedRMSNorm(self.d_inner, eps=1e-5, norm_before_gate=True,
                                     group_size=headdim, **factory)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False, **factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-draw dt_bias; B/C biases and D to 1; MIMO projections to mamba_ssm's constants."""
        init_ssm_parameters_(self)

    # ----------------------------------------------------------------------------- forward
    def project(self, u: torch.Tensor):
        """in_proj and the elementwise preprocessing, exactly as mamba_ssm's forward: the
        keyword arguments of ``mamba3_siso_combined`` (biases still (nheads, R, d_state))."""
        z, x, B, C, dd_dt, dd_A, trap, angles = self.in_proj_parts(u)
        z = rearrange(z, "b l (h p) -> b l h p", p=self.headdim)
        x = rearrange(x, "b l (h p) -> b l h p", p=self.headdim)
        B = rearrange(B, "b l (r g n) -> b l r g n", r=self.mimo_rank, g=self.num_bc_heads)
        C = rearrange(C, "b l (r g n) -> b l r g n", r=self.mimo_rank, g=self.num_bc_heads)
        act = F.softplus if self.A_activation == "softplus" else heavy_tail
        f32 = torch.promote_types(dd_A.dtype, torch.float32)  # fp32, as mamba_ssm (fp64 stays)
        A = torch.clamp(-act(dd_A.to(f32)), max=-self.A_floor)
        DT = F.softplus(dd_dt + self.dt_bias)
        return dict(
            Q=self.C_norm(C), K=self.B_norm(B), V=x,
            ADT=rearrange(A * DT, "b l h -> b h l"), DT=rearrange(DT, "b l h -> b h l"),
            Trap=rearrange(trap, "b l h -> b h l"),
            Angles=self.angles_per_head(angles),
            Z=z,
        )

    def in_proj_parts(self, u: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """in_proj's output as [z, x, B, C, dd_dt, dd_A, trap, angles] (views of one tensor)."""
        return torch.split(self.in_proj(u), self.split_sizes, -1)

    def angles_per_head(self, angles: torch.Tensor) -> torch.Tensor:
        """(b, l, n_angles) -> (b, l, nheads, n_angles), fp32 (fp64 stays), as mamba_ssm."""
        f32 = torch.promote_types(angles.dtype, torch.float32)
        return angles.unsqueeze(-2).expand(-1, -1, self.nheads, -1).to(f32)

    def scan(self, inputs: dict, seq_idx: torch.Tensor | None,
             carry: SequenceCarry | None = None) -> torch.Tensor:
        """The SISO scan (b, l, h, p); the fused backend overrides this one method."""
        if self.is_mimo:
            raise NotImplementedError(
                "the reference Mamba-3 mixer runs SISO only: MIMO (ssm_cfg.is_mimo=true) needs "
                "backend=fused with TileLang installed; set is_mimo=false to train on CPU")
        z = None if self.is_outproj_norm else inputs["Z"]
        return mamba3_siso_chunked(
            inputs["Q"].squeeze(2), inputs["K"].squeeze(2), inputs["V"], inputs["ADT"],
            inputs["DT"], inputs["Trap"], self.C_bias.squeeze(1), self.B_bias.squeeze(1),
            inputs["Angles"], D=self.D, Z=z, chunk_size=self.chunk_size, seq_idx=seq_idx,
            carry=carry)

    def forward(self, hidden_states: torch.Tensor, seq_idx: torch.Tensor | None = None,
                inference_params=None, carry: SequenceCarry | None = None) -> torch.Tensor:
        """hidden_states: (batch, seqlen, d_model); seq_idx: optional (batch, seqlen) document
        numbers -- the state, the RoPE angle and the previous-token term restart where it changes;
        carry: this is a slice of a longer sequence, joined to it through ``carry``."""
        if inference_params is not None:
            raise NotImplementedError("the Mamba-3 mixers here have no incremental decoding")
        carry = carry if carry is not None else self.sequence_carry
        inputs = self.project(hidden_states)
        y = self.scan(inputs, seq_idx, carry) if carry is not None else self.scan(inputs, seq_idx)
        y = rearrange(y, "b l h p -> b l (h p)")
        if self.is_outproj_norm:
            y = self.norm(y, rearrange(inputs["Z"], "b l h p -> b l (h p)"))
        return self.out_proj(y.to(inputs["V"].dtype))

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_inner={self.d_inner}, nheads={self.nheads}, "
                f"headdim={self.headdim}, d_state={self.d_state}, ngroups={self.num_bc_heads}, "
                f"rope_angles={self.num_rope_angles}, mimo_rank={self.mimo_rank}, "
                f"chunk_size={self.chunk_size}")

