"""Mamba-2's SSD through flash-linear-attention's ``simple_gla`` chunk kernels (GPU only).

The Mamba-2 recurrence per head is ``h_t = exp(A·Δ_t) h_{t-1} + Δ_t B_t x_tᵀ``,
``y_t = C_tᵀ h_t + D x_t``. Simple GLA is ``S_t = exp(g_t) S_{t-1} + k_t v_tᵀ``,
``o_t = scale · q_tᵀ S_t`` with one scalar log-decay per head and step, so the SSD part maps onto it
with ``q = C``, ``k = B``, ``v = Δ·x``, ``g = A·Δ`` and ``scale = 1``; the ``D`` skip, the gate and
the norm stay in PyTorch / mamba_ssm's gated-norm kernel, exactly as in ``mamba_ssm``'s
unfused Mamba-2 path (``use_mem_eff_path=False``).

Mamba-2 shares ``B``/``C`` across the heads of a group (``ngroups`` < heads); fla's kernels want one
``q``/``k`` per head. ``GroupedSimpleGLA`` expands them inside its forward/backward only, saves the
grouped tensors and sums the per-head gradients back over each group, so the expansion costs no
activation memory. Document boundaries (``seq_idx``) are refused: fla's varlen path flattens the
batch and needs the boundary offsets on the host, which a captured step cannot provide.

fla is imported lazily: ``kernels.ssd=fla`` without the package fails with one line, and
so does a stack where fla's gated backward is known to be wrong: on Hopper GPUs, Triton 3.4.0 up
to (not including) 3.7.1 miscompiles a transposed wgmma result in ``chunk_bwd_kernel_dqkwg``
(wrong dk / dg; fla-org/flash-linear-attention #640, fixed in Triton 3.7.1 per fla PR #983).
fla itself raises there at the first backward; ``check_fla_stack`` says so when the model is
built. torch 2.11 pins Triton 3.6.0, so on an H100/H200 with torch 2.11 this kernel choice
cannot train (measured 2026-12-02, benchmarks/results/2026-12-02-kernel-budget-and-fla-peer.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

from mamba_train.errors import MambaTrainError


class SSDKernelError(MambaTrainError, RuntimeError):
    """The chosen Mamba-2 SSD kernel cannot run here or on this input; the message says why."""


def _fla():
    try:
        from fla.ops.simple_gla.chunk import chunk_simple_gla_bwd, chunk_simple_gla_fwd
        from fla.ops.utils import chunk_local_cumsum
        from fla.ops.utils.constant import RCP_LN2
    except ImportError as e:
        raise SSDKernelError(
            f"kernels.ssd=fla needs flash-linear-attention ({e}); install "
            "`flash-linear-attention` or set kernels.ssd=mamba_ssm") from e
    return chunk_simple_gla_fwd, chunk_simple_gla_bwd, chunk_local_cumsum, RCP_LN2


def fla_stack_problem() -> str | None:
    """None where fla's simple-GLA training kernels can run, else why not (one sentence)."""
    import importlib.util

    if importlib.util.find_spec("fla") is None:
        return ("kernels.ssd=fla needs flash-linear-attention; install "
                "`flash-linear-attention` or set kernels.ssd=mamba_ssm")
    import triton
    from fla.utils import IS_NVIDIA_HOPPER, TRITON_ABOVE_3_4_0, TRITON_ABOVE_3_7_1

    if (IS_NVIDIA_HOPPER and TRITON_ABOVE_3_4_0 and not TRITON_ABOVE_3_7_1
            and importlib.util.find_spec("tilelang") is None):
        return (f"kernels.ssd=fla cannot train here: Triton {triton.__version__} on a "
                "Hopper GPU computes fla's gated chunk backward wrongly (fla-org/flash-linear-"
                "attention #640); it needs Triton >= 3.7.1 (or tilelang). Use kernels.ssd=mamba_ssm")
    return None


def check_fla_stack() -> None:
    problem = fla_stack_problem()
    if problem:
        raise SSDKernelError(problem)


def _per_head(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(b, l, groups, n) -> (b, l, heads, n), each group's row repeated for its heads."""
    b, l, g, n = t.shape
    return t.unsqueeze(3).expand(b, l, g, heads // g, n).reshape(b, l, heads, n)  # a copy unless g == heads


def _per_group(t: torch.Tensor, groups: int) -> torch.Tensor:
    """Gradient of ``_per_head``: (b, l, heads, n) summed over each group's heads."""
    b, l, h, n = t.shape
    return t.view(b, l, groups, h // groups, n).sum(3)


class GroupedSimpleGLA(torch.autograd.Function):
    """``o = SSD(v, g, B, C)`` with ``v`` (b, l, h, p), ``g`` (b, l, h) fp32 log-decay,
    ``B``/``C`` (b, l, groups, n); the same calls as fla's ``chunk_simple_gla`` with ``scale=1``,
    no initial or final state."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, v, g, B, C, chunk_size: int):
        fwd, _, cumsum, rcp_ln2 = _fla()
        v, B, C = v.contiguous(), B.contiguous(), C.contiguous()
        heads = v.shape[2]
        # fla's kernels use exp2: the chunk-local cumulative log-decay is kept in base 2
        gc = cumsum(g.float().contiguous(), chunk_size=chunk_size, scale=rcp_ln2)
        o, _ = fwd(q=_per_head(C, heads), k=_per_head(B, heads), v=v, g=gc, g_gamma=None,
                   scale=1.0, initial_state=None, output_final_state=False, chunk_size=chunk_size)
        ctx.save_for_backward(v, gc, B, C)
        ctx.chunk_size = chunk_size
        return o.to(v.dtype)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, do):
        _, bwd, cumsum, _ = _fla()
        v, gc, B, C = ctx.saved_tensors
        heads, groups, cs = v.shape[2], B.shape[2], ctx.chunk_size
        dq, dk, dv, dg, _ = bwd(q=_per_head(C, heads), k=_per_head(B, heads), v=v, g=gc,
                                g_gamma=None, initial_state=None, do=do.contiguous(), dht=None,
                                scale=1.0, chunk_size=cs)
        dg = cumsum(dg, chunk_size=cs, reverse=True)
        return (dv.to(v.dtype), dg, _per_group(dk, groups).to(B.dtype),
                _per_group(dq, groups).to(C.dtype), None)


def gla_ssd(v, g, B, C, chunk_size: int = 64) -> torch.Tensor:
    """fla's kernels: ``o_t = C_tᵀ S_t``, ``S_t = exp(g_t) S_{t-1} + B_t v_tᵀ`` per head."""
    return GroupedSimpleGLA.apply(v, g, B, C, chunk_size)


def causal_conv1d_fused(x: torch.Tensor, mixer) -> torch.Tensor:
    from causal_conv1d import causal_conv1d_fn
    return causal_conv1d_fn(x, rearrange(mixer.conv1d.weight, "d 1 w -> d w"),
                            bias=mixer.conv1d.bias, activation=mixer.activation)


def mamba2_forward_fla(mixer, u: torch.Tensor, ssd=gla_ssd, conv=causal_conv1d_fused) -> torch.Tensor:
    """A mamba_ssm ``Mamba2`` module's training forward with the SSD part as a simple-GLA
    recurrence (in_proj -> causal conv1d -> SSD -> D skip -> gate/norm -> out_proj).
    ``ssd(v, g, B, C)`` and ``conv(x, mixer)`` are the kernels (replaceable for CPU tests)."""
    m = mixer
    groups, n = m.ngroups, m.d_state
    zxbcdt = m.in_proj(u)
    d_mlp = (zxbcdt.shape[-1] - 2 * m.d_ssm - 2 * groups * n - m.nheads) // 2
    z0, x0, z, xBC, dt = torch.split(
        zxbcdt, [d_mlp, d_mlp, m.d_ssm, m.d_ssm + 2 * groups * n, m.nheads], dim=-1)
    xBC = conv(xBC.transpose(1, 2), m).transpose(1, 2)
    x, B, C = torch.split(xBC, [m.d_ssm, groups * n, groups * n], dim=-1)
    dt = F.softplus(dt.float() + m.dt_bias.float())
    lo, hi = m.dt_limit
    if (lo, hi) != (0.0, float("inf")):
        dt = dt.clamp(min=lo, max=hi)
    A = -torch.exp(m.A_log.float())
    xh = rearrange(x, "b l (h p) -> b l h p", p=m.headdim)
    y = ssd((xh * dt.unsqueeze(-1)).to(xh.dtype), dt * A,
            rearrange(B, "b l (g n) -> b l g n", g=groups),
            rearrange(C, "b l (g n) -> b l g n", g=groups))
    D = rearrange(m.D, "(h p) -> h p", p=m.headdim) if m.D_has_hdim else m.D.unsqueeze(-1)
    y = (y.float() + xh.float() * D.float()).to(xh.dtype)
    y = rearrange(y, "b l h p -> b l (h p)")
    y = m.norm(y, z) if m.rmsnorm else y * F.silu(z)
    if d_mlp > 0:
        y = torch.cat([F.silu(z0) * x0, y], dim=-1)
    return m.out_proj(y)
