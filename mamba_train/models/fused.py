"""The fused GPU mixers: ``mamba_ssm``'s own modules, adapted to the init contract.

Imported only when the fused backend is chosen, so ``import mamba_train`` works without CUDA.
The subclasses add nothing to the maths; they (1) record the init arguments and expose
``reset_parameters`` so framework materialisation re-runs the SSM init, (2) swap Mamba-1's
``dt_proj`` ``nn.Linear`` for a ``DeltaProjection`` holding the same parameters (see
``models/init.py``), and (3) accept ``seq_idx`` uniformly. Mamba-3 is the exception: the
reference module with its scan swapped for mamba_ssm's kernel (see ``FusedMamba3``).
"""

from __future__ import annotations

import functools
from fractions import Fraction

import torch
import torch.nn.functional as F
from mamba_ssm.modules.mamba2 import Mamba2 as _Mamba2
from einops import rearrange
from mamba_ssm.modules import mamba_simple
from mamba_ssm.modules.mamba_simple import Mamba as _Mamba
from mamba_ssm.ops.selective_scan_interface import mamba_inner_fn, selective_scan_fn
from mamba_ssm.ops.triton.layer_norm import layer_norm_fn

from mamba_train.models.checkpoint_compat import saved_tensors_read_once
from mamba_train.models.init import DeltaProjection, SSMInitSpec, init_ssm_parameters_
from mamba_train.models.layers import RMSNorm
from mamba_train.models.reference.mamba1 import add_dt_bc_norms, split_x_proj
from mamba_train.models.reference.mamba3 import Mamba3 as _ReferenceMamba3
from mamba_train.models.reference.mamba3 import MimoKernelError
from mamba_train.models.reference.mamba3_ops import cu_seqlens_from_seq_idx
from mamba_train.models.split_linear import SplitOutputLinear


class FusedMamba(_Mamba):
    # set by mamba_train.parallel when each rank holds a slice of the sequence
    # (models/state_passing.py; the slice runs models/fused_carried.py)
    sequence_carry = None
    # mamba_inner_fn's checkpoint_lvl: 1 (mamba_ssm's choice) recomputes the conv1d output and
    # delta in the backward; 0 keeps them, 2 x d_inner x tokens bf16 values more per layer
    # (kernels.mamba1_recompute, applied by set_mamba1_recompute)
    checkpoint_lvl = 1

    def __init__(self, d_model, dt_min=0.001, dt_max=0.1, dt_init="random", dt_scale=1.0,
                 dt_init_floor=1e-4, dt_bc_norm=False, norm_eps=1e-5, **kwargs):
        super().__init__(d_model, dt_min=dt_min, dt_max=dt_max, dt_init=dt_init,
                         dt_scale=dt_scale, dt_init_floor=dt_init_floor, **kwargs)
        self.ssm_init = SSMInitSpec(dt_min=dt_min, dt_max=dt_max, dt_init_floor=dt_init_floor,
                                    dt_init=dt_init, dt_scale=dt_scale)
        self.dt_proj = DeltaProjection.from_linear(self.dt_proj, self.ssm_init)
        add_dt_bc_norms(self, dt_bc_norm, norm_eps, device=kwargs.get("device"),
                        dtype=kwargs.get("dtype"))

    def reset_parameters(self) -> None:
        init_ssm_parameters_(self)

    def forward(self, hidden_states, seq_idx=None, inference_params=None, carry=None):
        carry = carry if carry is not None else self.sequence_carry
        if seq_idx is not None:
            raise NotImplementedError(
                "document boundaries (seq_idx) are not supported by the fused Mamba-1 kernel: "
                "mamba_ssm has no varlen selective scan. Use Mamba-2 (ssm_cfg.layer=Mamba2), the "
                "reference backend, or data.document_boundaries=false."
            )
        if carry is not None and inference_params is None:
            from mamba_train.models.fused_carried import mamba1_forward
            return mamba1_forward(self, hidden_states, carry)
        if self.dt_norm is not None:
            if inference_params is not None:
                raise NotImplementedError("the Mamba-1 mixer with dt/B/C norms (Jamba) has no "
                                          "incremental decoding here")
            return self._forward_dt_bc_norm(hidden_states)
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


    def _forward_dt_bc_norm(self, hidden_states):
        """mamba_ssm's unfused training path (causal_conv1d_fn, selective_scan_fn) with Jamba's
        norms where x_proj's output is split: mamba_inner_fn's own dt/B/C norm arguments put the
        dt norm after dt_proj (d_inner wide, not Jamba's dt_rank) and return no gradient for
        the norm weights, so the fused inner function cannot compute this model."""
        seqlen = hidden_states.shape[1]
        xz = rearrange(self.in_proj(hidden_states), "b l d -> b d l")
        x, z = xz.chunk(2, dim=1)
        x = mamba_simple.causal_conv1d_fn(
            x=x.contiguous(), weight=rearrange(self.conv1d.weight, "d 1 w -> d w"),
            bias=self.conv1d.bias, activation=self.activation)
        x_dbl = self.x_proj(rearrange(x, "b d l -> (b l) d"))
        dt, B, C = split_x_proj(self, x_dbl)
        dt = rearrange(F.linear(dt, self.dt_proj.weight), "(b l) d -> b d l", l=seqlen)
        B = rearrange(B, "(b l) n -> b n l", l=seqlen).contiguous()
        C = rearrange(C, "(b l) n -> b n l", l=seqlen).contiguous()
        y = selective_scan_fn(x, dt.contiguous(), -torch.exp(self.A_log.float()), B, C,
                              self.D.float(), z=z.contiguous(),
                              delta_bias=self.dt_proj.bias.float(), delta_softplus=True)
        return self.out_proj(rearrange(y, "b d l -> b l d"))


def set_mamba1_recompute(model: torch.nn.Module, recompute: bool) -> None:
    """Whether the fused Mamba-1 backward recomputes conv1d output and delta (mamba_ssm's
    default) or keeps them from the forward."""
    for m in model.modules():
        if isinstance(m, FusedMamba):
            m.checkpoint_lvl = 1 if recompute else 0


def set_ssd_kernel(model: torch.nn.Module, kernel: str) -> bool:
    """The Mamba-2 SSD kernels of every fused Mamba-2 mixer (``kernels.ssd``): ``mamba_ssm``
    (its fused split-conv1d-scan Function), ``mamba_train`` (the same kernels with the forward's
    SSD tensors kept for the backward, ``models/ssd_split.py``) or ``fla`` (flash-linear-attention's
    simple-GLA chunk kernels, ``models/ssd_fla.py``). Returns whether the model has such a mixer."""
    mixers = [m for m in model.modules() if isinstance(m, FusedMamba2)]
    if mixers and kernel == "fla":
        from mamba_train.models.ssd_fla import check_fla_stack
        check_fla_stack()
    elif mixers and kernel == "mamba_train":
        from mamba_train.models import ssd_upstream
        ssd_upstream.check()
        if not all(m.use_mem_eff_path for m in mixers):
            raise ssd_upstream.SSDKernelError(
                "kernels.ssd=mamba_train replaces mamba_ssm's fused path: set "
                "model.ssm_cfg.use_mem_eff_path=true or kernels.ssd=mamba_ssm")
    for m in mixers:
        m.ssd_kernel = kernel
    return bool(mixers)


class FusedMamba2(_Mamba2):
    """mamba_ssm's Mamba2 with the SSD kernels chosen by :func:`set_ssd_kernel`. A slice of a
    longer sequence (a carry) runs mamba_ssm's chunk scan whatever ``kernels.ssd`` says
    (``models/fused_carried.py``)."""

    ssd_kernel = "mamba_ssm"  # mamba_ssm's own forward until set_ssd_kernel says otherwise
    sequence_carry = None  # set by mamba_train.parallel (models/state_passing.py)

    def __init__(self, d_model, dt_min=0.001, dt_max=0.1, dt_init_floor=1e-4,
                 A_init_range=(1, 16), conv_init=None, d_inner=None,
                 norm_eps=1e-5, A_init="uniform", dt_bias_init=None, **kwargs):
        if d_inner is not None:
            # mamba_ssm sizes everything from (expand * d_model) // world_size: an exact
            # Fraction gives the integer width where a float ratio (7168/3072) would not
            kwargs["expand"] = Fraction(int(d_inner), d_model)
        super().__init__(d_model, dt_min=dt_min, dt_max=dt_max, dt_init_floor=dt_init_floor,
                         A_init_range=A_init_range, conv_init=conv_init, **kwargs)
        if getattr(self, "norm", None) is not None:
            self.norm.eps = norm_eps  # mamba_ssm fixes 1e-5; its kernels read norm.eps
        self.ssm_init = SSMInitSpec(dt_min=dt_min, dt_max=dt_max, dt_init_floor=dt_init_floor,
                                    A_init_range=tuple(A_init_range), conv_init=conv_init,
                                    A_init=A_init, dt_bias_init=dt_bias_init)

    def reset_parameters(self) -> None:
        init_ssm_parameters_(self)

    def forward(self, hidden_states, seq_idx=None, inference_params=None, carry=None):
        carry = carry if carry is not None else self.sequence_carry
        if carry is not None and inference_params is None:
            from mamba_train.models.fused_carried import mamba2_forward
            if seq_idx is not None:
                seq_idx = seq_idx.to(torch.int32).contiguous()
            return mamba2_forward(self, hidden_states, seq_idx, carry)
        if self.ssd_kernel == "fla" and inference_params is None:
            if seq_idx is not None:
                from mamba_train.models.ssd_fla import SSDKernelError
                raise SSDKernelError(
                    "kernels.ssd=fla does not take document boundaries (seq_idx): "
                    "set data.document_boundaries=false or kernels.ssd=mamba_ssm")
            from mamba_train.models.ssd_fla import mamba2_forward_fla
            return mamba2_forward_fla(self, hidden_states)
        if seq_idx is not None:
            seq_idx = seq_idx.to(torch.int32).contiguous()
        if (self.ssd_kernel == "mamba_train" and self.use_mem_eff_path and inference_params is None
                and self.process_group is None):
            from mamba_train.models.ssd_split import mamba2_forward
            return mamba2_forward(self, hidden_states, seq_idx=seq_idx)
        return super().forward(hidden_states, seq_idx=seq_idx, inference_params=inference_params)


class FusedMamba3(_ReferenceMamba3):
    """Mamba-3 on mamba_ssm's kernels: the reference module's parameters and preprocessing
    (``mamba_ssm.modules.mamba3.Mamba3.forward``'s maths; in_proj as grouped GEMMs and the angles
    as a bf16 view, for speed), with the scan replaced by ``mamba3_siso_combined`` (Triton).
    Document boundaries go in as ``cu_seqlens``: the micro-batch is flattened to one varlen sequence cut at every window and document start
    (mamba_ssm's Mamba3 takes no ``seq_idx``). MIMO runs mamba_ssm's own forward (TileLang)."""

    # cu_seqlens' length is the document count: a host sync, so no CUDA-graph capture with
    # document boundaries (training/step/cuda_graph.py reads this flag)
    varlen_needs_host_sync = True

    def __init__(self, d_model, **kwargs):
        super().__init__(d_model, **kwargs)
        from mamba_ssm.ops.triton.layernorm_gated import RMSNorm as TritonGatedRMSNorm

        # the B/C (and output) norms on mamba_ssm's Triton kernel, as its Mamba3 does: same
        # parameter (``weight``), same maths, fewer kernels than the PyTorch form
        for name in ("B_norm", "C_norm", "norm"):
            old = getattr(self, name, None)
            if old is not None:
                setattr(self, name, TritonGatedRMSNorm(
                    old.weight.shape[0], eps=old.eps, group_size=old.group_size,
                    norm_before_gate=old.norm_before_gate, device=old.weight.device,
                    dtype=old.weight.dtype))
        if self.is_mimo:  # mamba_ssm's own forward: one in_proj tensor, its A activation
            _mimo_kernel()  # fail at build time, not at the first step
            if self.A_activation != "softplus":
                raise ValueError("Mamba-3 MIMO runs mamba_ssm 2.3.2's own forward, which uses "
                                 "A_activation=softplus; drop ssm_cfg.A_activation")
        else:
            # z and x as GEMM outputs of their own: see models/split_linear.py for the copies
            # and the cat this saves; same parameter, same name
            split = SplitOutputLinear(d_model, [self.d_inner, self.d_inner,
                                                sum(self.split_sizes[2:])], device="meta")
            split.weight = self.in_proj.weight
            self.in_proj = split

    def in_proj_parts(self, u):
        if not isinstance(self.in_proj, SplitOutputLinear):  # MIMO
            return super().in_proj_parts(u)
        z, x, rest = self.in_proj(u)
        return (z, x, *torch.split(rest, self.split_sizes[2:], -1))

    def angles_per_head(self, angles):
        # mamba3_siso_combined rounds Angles to bf16 first thing, so from a bf16 projection
        # (autocast) mamba_ssm's fp32 copy per head goes bf16 -> fp32 -> bf16 unchanged. Handing
        # the kernel the stride-0 bf16 view instead gives the same values, and the same gradient
        # (autograd rounds it to bf16 before the sum over heads either way), without writing two
        # (b, l, nheads, n_angles) tensors per layer (angle_dt reads through strides).
        if angles.dtype == torch.bfloat16:
            return angles.unsqueeze(-2).expand(-1, -1, self.nheads, -1)
        return super().angles_per_head(angles)

    def scan(self, inputs, seq_idx, carry=None):
        if carry is not None:  # a slice of a longer sequence: models/fused_carried.py
            from mamba_train.models.fused_carried import mamba3_scan
            return mamba3_scan(self, inputs, seq_idx, carry, mamba3_siso_scan)
        z = None if self.is_outproj_norm else inputs["Z"]
        args = dict(Q=inputs["Q"].squeeze(2), K=inputs["K"].squeeze(2), V=inputs["V"],
                    ADT=inputs["ADT"], DT=inputs["DT"], Trap=inputs["Trap"],
                    Angles=inputs["Angles"], Z=z)
        common = dict(Q_bias=self.C_bias.squeeze(1), K_bias=self.B_bias.squeeze(1), D=self.D,
                      chunk_size=self.chunk_size)
        if seq_idx is None:
            return mamba3_siso_scan(**args, **common)
        batch = args["V"].shape[0]
        flat = {k: (None if v is None else
                    rearrange(v, "b h l -> 1 h (b l)") if k in ("ADT", "DT", "Trap")
                    else rearrange(v, "b l ... -> 1 (b l) ..."))
                for k, v in args.items()}
        y = mamba3_siso_scan(**flat, **common, cu_seqlens=cu_seqlens_from_seq_idx(seq_idx))
        return rearrange(y, "1 (b l) h p -> b l h p", b=batch)

    def forward(self, hidden_states, seq_idx=None, inference_params=None, carry=None):
        if not self.is_mimo:
            return super().forward(hidden_states, seq_idx=seq_idx,
                                   inference_params=inference_params, carry=carry)
        if carry is not None or self.sequence_carry is not None:
            raise NotImplementedError(
                "Mamba-3 MIMO takes no carried state here (context parallelism runs the SISO "
                "kernels): set ssm_cfg.is_mimo=false or strategy.context_parallel_size=1")
        if inference_params is not None:
            raise NotImplementedError("the Mamba-3 mixers here have no incremental decoding")
        upstream = _mimo_kernel()
        if seq_idx is None:
            return upstream.forward(self, hidden_states)
        batch = hidden_states.shape[0]
        out = upstream.forward(self, rearrange(hidden_states, "b l d -> 1 (b l) d"),
                               cu_seqlens=cu_seqlens_from_seq_idx(seq_idx))
        return rearrange(out, "1 (b l) d -> b l d", b=batch)


@functools.cache
def _mamba3_siso_function():
    # mamba_ssm's public entry point (mamba3_siso_combined) only casts the activations to bf16
    # and calls this Function; calling it directly is what lets the backward be wrapped.
    # A private name, checked against mamba_ssm 2.3.2: tests/gpu/test_mamba3_gpu.py compares the
    # fused mixer with mamba_ssm's Mamba3 (which calls the public entry point), and
    # test_activation_checkpointing_gpu.py runs it checkpointed
    import importlib

    upstream = importlib.import_module("mamba_ssm.ops.triton.mamba3.mamba3_siso_combined")
    function = getattr(upstream, "_Mamba3Function", None)
    if function is None:
        from importlib.metadata import version
        raise ImportError(
            f"mamba_ssm {version('mamba_ssm')} has no mamba3_siso_combined._Mamba3Function "
            "(mamba_train's fused Mamba-3 was checked with mamba_ssm 2.3.2): install "
            "mamba-ssm==2.3.2, or use backend=reference")
    return saved_tensors_read_once(function)


def mamba3_siso_scan(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D=None, Z=None,
                     chunk_size: int = 64, cu_seqlens=None, input_states=None):
    """``mamba_ssm``'s ``mamba3_siso_combined``, through :func:`saved_tensors_read_once` so it
    can sit inside a checkpointed block. Same casts as upstream: activations to bf16; ADT, DT and
    the parameters as they come. Without ``input_states`` (training) the output alone; with them
    ((angle, SSM, k, v) states entering each sequence: a context-parallel slice) the output and
    the final SSM state."""
    def bf16(t):
        return None if t is None else t.to(torch.bfloat16)

    carried = input_states is not None
    out = _mamba3_siso_function().apply(
        bf16(Q), bf16(K), bf16(V), ADT, DT, bf16(Trap), Q_bias, K_bias, bf16(Angles), D, bf16(Z),
        *(input_states if carried else (None,) * 4), cu_seqlens, chunk_size, carried)
    return (out[0], out[2]) if carried else out


def _mimo_kernel():
    """mamba_ssm's Mamba3 class when its MIMO (TileLang) kernels import, else a clear error."""
    from mamba_ssm.modules import mamba3 as upstream

    if getattr(upstream, "mamba3_mimo_combined", None) is None:
        raise MimoKernelError(
            "Mamba-3 MIMO (ssm_cfg.is_mimo=true) needs mamba_ssm's TileLang kernels, which did "
            "not import: `pip install tilelang` (mamba_ssm's MIMO kernels are written in it), or "
            "set ssm_cfg.is_mimo=false for the Triton SISO kernels")
    return upstream.Mamba3


def add_norm_fused(hidden, residual, norm, residual_in_fp32: bool, prenorm: bool = True):
    """mamba_ssm's Triton add + RMS/LayerNorm (same maths as ``add_norm_reference``)."""
    return layer_norm_fn(
        hidden, norm.weight, norm.bias, residual=residual, prenorm=prenorm,
        residual_in_fp32=residual_in_fp32, eps=norm.eps, is_rms_norm=isinstance(norm, RMSNorm),
    )
