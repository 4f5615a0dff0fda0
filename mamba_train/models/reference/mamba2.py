"""Reference Mamba-2 mixer: ``mamba_ssm.modules.mamba2.Mamba2`` in pure PyTorch.

Same constructor arguments, parameter names, shapes, dtypes and initial distributions as
``mamba_ssm`` 2.3.2. The forward follows mamba_ssm's split path (in_proj -> [z0, x0, z, xBC, dt]
-> causal conv + SiLU on xBC -> chunked SSD -> gated RMSNorm -> [gated MLP part] -> out_proj),
which computes the same function as its fused ``mamba_split_conv1d_scan_combined`` path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mamba_train.models.init import SSMInitSpec, init_ssm_parameters_
from mamba_train.models.reference.common import gated_rms_norm
from mamba_train.models.reference.ssd import ssd_chunked
from mamba_train.models.state_passing import SequenceCarry, carried_causal_conv1d


def split_in_proj(m, zxbcdt: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """mamba_ssm ``Mamba2``'s in_proj output split as its forward does: ``(z0, x0, z, xBC, dt)``
    (z0/x0 the optional parallel MLP's halves, empty when ``d_mlp == 0``), for any module with
    the ``Mamba2`` attribute names (this reference, or mamba_ssm's own on the fused path)."""
    ng_ds = m.ngroups * m.d_state
    d_mlp = (zxbcdt.shape[-1] - 2 * m.d_ssm - 2 * ng_ds - m.nheads) // 2
    return torch.split(zxbcdt, [d_mlp, d_mlp, m.d_ssm, m.d_ssm + 2 * ng_ds, m.nheads], dim=-1)


class GatedRMSNorm(nn.Module):
    """``mamba_ssm.ops.triton.layernorm_gated.RMSNorm``: RMSNorm (per group of ``group_size``
    channels) gated by z -- norm(x) * silu(z) if norm_before_gate else norm(x * silu(z))."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, group_size: int | None = None,
                 norm_before_gate: bool = True, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden_size, device=device, dtype=dtype))
        self.register_parameter("bias", None)
        self.group_size = group_size
        self.norm_before_gate = norm_before_gate
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        return gated_rms_norm(x, self.weight, z=z, eps=self.eps, group_size=self.group_size,
                              norm_before_gate=self.norm_before_gate, bias=self.bias)

    def extra_repr(self) -> str:
        return (f"{self.weight.shape[0]}, eps={self.eps}, group_size={self.group_size}, "
                f"norm_before_gate={self.norm_before_gate}")


class Mamba2(nn.Module):
    """Mamba-2 (SSD) mixer, (batch, seqlen, d_model) -> (batch, seqlen, d_model).

    Parameters (as mamba_ssm): ``in_proj`` (2*d_inner + 2*ngroups*d_state + nheads, d_model) with
    output order [z0, x0 (d_inner - d_ssm each), z, x (d_ssm), B, C (ngroups*d_state), dt
    (nheads)], ``conv1d`` depthwise over d_ssm + 2*ngroups*d_state channels, ``dt_bias`` (nheads),
    ``A_log`` (nheads), ``D`` (nheads, or d_ssm with D_has_hdim) in fp32, ``norm.weight`` (d_ssm,
    only if rmsnorm), ``out_proj`` (d_model, d_inner).
    Beyond mamba_ssm (for the transformers hybrids): ``d_inner`` (inner width other than
    expand*d_model), ``norm_eps`` (the gated norm's eps), ``A_init``/``dt_bias_init`` (their SSM init).
    ``use_mem_eff_path`` and ``sequence_parallel`` are accepted and ignored;
    ``process_group`` must be None (no tensor parallelism in the reference).
    ``sequence_carry``: set by ``mamba_train.parallel`` when each rank holds a slice of the
    sequence (``models/state_passing.py``); None runs whole sequences.
    """

    sequence_carry: SequenceCarry | None = None

    def __init__(
        self,
        d_model: int,
        d_state: int = 128,
        d_conv: int = 4,
        conv_init: float | None = None,
        expand: int = 2,
        headdim: int = 64,
        d_ssm: int | None = None,
        ngroups: int = 1,
        A_init_range=(1, 16),
        D_has_hdim: bool = False,
        rmsnorm: bool = True,
        norm_before_gate: bool = False,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        dt_limit=(0.0, float("inf")),
        bias: bool = False,
        conv_bias: bool = True,
        chunk_size: int = 256,
        use_mem_eff_path: bool = True,
        d_inner: int | None = None,
        norm_eps: float = 1e-5,
        A_init: str = "uniform",
        dt_bias_init: float | None = None,
        layer_idx: int | None = None,
        process_group=None,
        sequence_parallel: bool = True,
        device=None,
        dtype=None,
    ):
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        if process_group is not None:
            raise NotImplementedError("the reference Mamba2 mixer has no tensor parallelism "
                                      "(process_group must be None)")
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.conv_init = conv_init
        self.expand = expand
        self.process_group = None
        self.sequence_parallel = sequence_parallel
        self.world_size = 1
        self.local_rank = 0
        # d_inner: an explicit inner width (Nemotron-H's heads*head_dim, Falcon-H1's d_ssm)
        self.d_inner = int(d_inner or expand * d_model)
        self.headdim = headdim
        self.d_ssm = self.d_inner if d_ssm is None else d_ssm
        self.ngroups = ngroups
        if self.d_ssm % headdim:
            raise ValueError(f"d_ssm={self.d_ssm} must be divisible by headdim={headdim}")
        self.nheads = self.d_ssm // headdim
        if self.nheads % ngroups:
            raise ValueError(f"nheads={self.nheads} must be divisible by ngroups={ngroups}")
        if not (A_init_range[0] > 0 and A_init_range[1] >= A_init_range[0]):
            raise ValueError(f"A_init_range must satisfy 0 < lo <= hi, got {A_init_range}")
        self.D_has_hdim = D_has_hdim
        self.rmsnorm = rmsnorm
        self.norm_before_gate = norm_before_gate
        self.dt_limit = tuple(dt_limit)
        self.activation = "silu"
        self.chunk_size = chunk_size
        self.use_mem_eff_path = use_mem_eff_path
        self.layer_idx = layer_idx
        self.ssm_init = SSMInitSpec(
            dt_min=dt_min, dt_max=dt_max, dt_init_floor=dt_init_floor,
            A_init_range=tuple(A_init_range), conv_init=conv_init, A_init=A_init,
            dt_bias_init=dt_bias_init,
        )

        # Order: [z, x, B, C, dt] (plus [z0, x0] in front when d_ssm < d_inner)
        d_in_proj = 2 * self.d_inner + 2 * ngroups * d_state + self.nheads
        self.in_proj = nn.Linear(d_model, d_in_proj, bias=bias, **factory_kwargs)
        conv_dim = self.d_ssm + 2 * ngroups * d_state
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, kernel_size=d_conv, groups=conv_dim,
                                padding=d_conv - 1, bias=conv_bias, **factory_kwargs)
        self.act = nn.SiLU()
        self.dt_bias = nn.Parameter(torch.empty(self.nheads, **factory_kwargs))
        # mamba_ssm stores A_log in ``dtype`` (fp32 when dtype is None) and D always in fp32
        self.A_log = nn.Parameter(torch.empty(
            self.nheads, device=device, dtype=dtype if dtype is not None else torch.float32))
        self.D = nn.Parameter(torch.empty(self.d_ssm if D_has_hdim else self.nheads,
                                          device=device, dtype=torch.float32))
        if rmsnorm:
            self.norm = GatedRMSNorm(self.d_ssm, eps=norm_eps, norm_before_gate=norm_before_gate,
                                     group_size=self.d_ssm // ngroups, **factory_kwargs)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **factory_kwargs)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-draw the SSM parameters (dt_bias, A_log, D, and conv1d.weight if conv_init)."""
        init_ssm_parameters_(self)

    def forward(self, hidden_states: torch.Tensor, seq_idx: torch.Tensor | None = None,
                inference_params=None, carry: SequenceCarry | None = None) -> torch.Tensor:
        """hidden_states: (batch, seqlen, d_model); seq_idx: optional (batch, seqlen) int32
        document numbers -- the conv window and the SSM state restart where it changes;
        carry: this is a slice of a longer sequence, joined to it through ``carry``."""
        carry = carry if carry is not None else self.sequence_carry
        if inference_params is not None:
            raise NotImplementedError("the reference Mamba2 mixer has no incremental decoding")
        batch, seqlen, _ = hidden_states.shape
        zxbcdt = self.in_proj(hidden_states)
        A = -torch.exp(self.A_log.float())
        ng_ds = self.ngroups * self.d_state
        z0, x0, z, xBC, dt = split_in_proj(self, zxbcdt)
        xBC = carried_causal_conv1d(xBC.transpose(1, 2), self.conv1d.weight, self.conv1d.bias,
                                    seq_idx, self.activation, carry).transpose(1, 2)
        x, B, C = torch.split(xBC, [self.d_ssm, ng_ds, ng_ds], dim=-1)
        y = ssd_chunked(
            x.reshape(batch, seqlen, self.nheads, self.headdim),
            dt,
            A,
            B.reshape(batch, seqlen, self.ngroups, self.d_state),
            C.reshape(batch, seqlen, self.ngroups, self.d_state),
            chunk_size=self.chunk_size,
            D=self.D.reshape(self.nheads, self.headdim) if self.D_has_hdim else self.D,
            dt_bias=self.dt_bias,
            dt_softplus=True,
            seq_idx=seq_idx,
            dt_limit=self.dt_limit,
            z=None if self.rmsnorm else z.reshape(batch, seqlen, self.nheads, self.headdim),
            carry=carry,
        )
        y = y.reshape(batch, seqlen, self.d_ssm)
        if self.rmsnorm:
            y = self.norm(y, z)
        if z0.shape[-1] > 0:
            y = torch.cat([F.silu(z0) * x0, y], dim=-1)
        return self.out_proj(y)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_ssm={self.d_ssm}, nheads={self.nheads}, "
                f"headdim={self.headdim}, d_state={self.d_state}, ngroups={self.ngroups}, "
                f"chunk_size={self.chunk_size}")
