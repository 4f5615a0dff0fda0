"""The fused GPU mixers: ``mamba_ssm``'s own modules, adapted to the init contract.

Imported only when the fused backend is chosen, so ``import mamba_train`` works without CUDA.
The subclasses add nothing to the maths; they (1) record the init arguments and expose
``reset_parameters`` so framework materialisation re-runs the SSM init, (2) swap Mamba-1's
``dt_proj`` ``nn.Linear`` for a ``DeltaProjection`` holding the same parameters (see
``models/init.py``), and (3) accept ``seq_idx`` uniformly.
"""

from __future__ import annotations

import torch
from mamba_ssm.modules.mamba2 import Mamba2 as _Mamba2
from einops import rearrange
from mamba_ssm.modules import mamba_simple
from mamba_ssm.modules.mamba_simple import Mamba as _Mamba
from mamba_ssm.ops.selective_scan_interface import mamba_inner_fn
from mamba_ssm.ops.triton.layer_norm import layer_norm_fn

from mamba_train.models.init import DeltaProjection, SSMInitSpec, init_ssm_parameters_
from mamba_train.models.layers import RMSNorm


class FusedMamba(_Mamba):
    # mamba_inner_fn's checkpoint_lvl: 1 (mamba_ssm's choice) recomputes the conv1d output and
    # delta in the backward; 0 keeps them, 2 x d_inner x tokens bf16 values more per layer
    # (train.mamba1_recompute, applied by set_mamba1_recompute)
    checkpoint_lvl = 1

    def __init__(self, d_model, dt_min=0.001, dt_max=0.1, dt_init="random", dt_scale=1.0,
                 dt_init_floor=1e-4, **kwargs):
        super().__init__(d_model, dt_min=dt_min, dt_max=dt_max, dt_init=dt_init,
                         dt_scale=dt_scale, dt_init_floor=dt_init_floor, **kwargs)
        self.ssm_init = SSMInitSpec(dt_min=dt_min, dt_max=dt_max, dt_init_floor=dt_init_floor,
                                    dt_init=dt_init, dt_scale=dt_scale)
        self.dt_proj = DeltaProjection.from_linear(self.dt_proj, self.ssm_init)

    def reset_parameters(self) -> None:
        init_ssm_parameters_(self)

    def forward(self, hidden_states, seq_idx=None, inference_params=None):
        if seq_idx is not None:
            raise NotImplementedError(
                "document boundaries (seq_idx) are not supported by the fused Mamba-1 kernel: "
                "mamba_ssm has no varlen selective scan. Use Mamba-2 (ssm_cfg.layer=Mamba2), the "
                "reference backend, or data.document_boundaries=false."
            )
        fast_path = (self.use_fast_path and mamba_simple.causal_conv1d_fn is not None
                     and inference_params is None)
        if self.checkpoint_lvl == 1 or not fast_path:
            return super().forward(hidden_states, inference_params=inference_params)
        # mamba_ssm's training fast path, the same calls, with checkpoint_lvl passed through
        seqlen = hidden_states.shape[1]
        xz = rearrange(self.in_proj.weight @ rearrange(hidden_states, "b l d -> d (b l)"),
                       "d (b l) -> b d l", l=seqlen)
        if self.in_proj.bias is not None:
            xz = xz + rearrange(self.in_proj.bias.to(dtype=xz.dtype), "d -> d 1")
        return mamba_inner_fn(
            xz, self.conv1d.weight, self.conv1d.bias, self.x_proj.weight, self.dt_proj.weight,
            self.out_proj.weight, self.out_proj.bias, -torch.exp(self.A_log.float()), None, None,
            self.D.float(), delta_bias=self.dt_proj.bias.float(), delta_softplus=True,
            checkpoint_lvl=self.checkpoint_lvl,
        )


def set_mamba1_recompute(model: torch.nn.Module, recompute: bool) -> None:
    """Whether the fused Mamba-1 backward recomputes conv1d output and delta (mamba_ssm's
    default) or keeps them from the forward."""
    for m in model.modules():
        if isinstance(m, FusedMamba):
            m.checkpoint_lvl = 1 if recompute else 0


class FusedMamba2(_Mamba2):
    def __init__(self, d_model, dt_min=0.001, dt_max=0.1, dt_init_floor=1e-4,
                 A_init_range=(1, 16), conv_init=None, **kwargs):
        super().__init__(d_model, dt_min=dt_min, dt_max=dt_max, dt_init_floor=dt_init_floor,
                         A_init_range=A_init_range, conv_init=conv_init, **kwargs)
        self.ssm_init = SSMInitSpec(dt_min=dt_min, dt_max=dt_max, dt_init_floor=dt_init_floor,
                                    A_init_range=tuple(A_init_range), conv_init=conv_init)

    def reset_parameters(self) -> None:
        init_ssm_parameters_(self)

    def forward(self, hidden_states, seq_idx=None, inference_params=None):
        if seq_idx is not None:
            seq_idx = seq_idx.to(torch.int32).contiguous()
        return super().forward(hidden_states, seq_idx=seq_idx, inference_params=inference_params)


def add_norm_fused(hidden, residual, norm, residual_in_fp32: bool, prenorm: bool = True):
    """mamba_ssm's Triton add + RMS/LayerNorm (same maths as ``add_norm_reference``)."""
    return layer_norm_fn(
        hidden, norm.weight, norm.bias, residual=residual, prenorm=prenorm,
        residual_in_fp32=residual_in_fp32, eps=norm.eps, is_rms_norm=isinstance(norm, RMSNorm),
    )
