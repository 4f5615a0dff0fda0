"""Mamba-2's SSD (chunked state-space dual) on mamba_ssm's Triton kernels, without the backward's
recomputation: ``kernels.ssd=mamba_train``.

mamba_ssm's SSD backward (``ssd_combined._mamba_chunk_scan_combined_bwd``) starts by running four
forward kernels again: the chunk cumsum of ``A·Δ`` (``dA_cumsum`` and the softplus'd ``Δ``), the
``C·Bᵀ`` products per chunk, the per-chunk states and the state passing between chunks. Here the
forward keeps their outputs for the backward instead, and the backward is mamba_ssm's sequence of
backward kernels on them, unchanged. Extra activation memory per layer: the passed states in fp32
``(batch, nchunks, nheads, headdim, d_state)``, CB in fp32 ``(batch, nchunks, ngroups, chunk,
chunk)`` and two fp32 ``(batch, nheads, nchunks, chunk)`` tensors.

Exactness: every kernel is mamba_ssm's, called on bit-identical inputs. The one difference in the
forward is the passed states' storage dtype: mamba_ssm's forward stores them in the activations'
dtype and its backward recomputes them in fp32; here they are stored in fp32 once (what the
backward needs) and ``_chunk_scan_fwd`` rounds them to the activations' dtype on load, which is
the rounding the state-passing kernel applies on store. So values and gradients match mamba_ssm's
bit for bit (tests/gpu/test_ssd_gpu.py checks this). ``fused_kernels`` swaps two or three of the
backward's kernels (dx, d(CB), the intra-chunk dA term) for one of ours: same formulas, fp32 sums
in another order. ``forward_kernels="fused"`` (``MAMBA_TRAIN_SSD_FORWARD``) runs the forward's
chunk_state + state_passing + chunk_scan as one kernel of ours (models/ssd_fwd_kernel.py), which
keeps the same tensors: same formulas, fp32 sums in another order.

The pieces are private mamba_ssm names, all read through ``models/ssd_upstream.py``.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
from einops import rearrange

from mamba_train.models.ssd_fla import SSDKernelError
from mamba_train.models.ssd_upstream import upstream

NO_DT_LIMIT = (0.0, float("inf"))
# Kernels of ours in the backward (same formulas as mamba_ssm's, fp32 sums in another order):
#   "none"     mamba_ssm's _chunk_scan_chunk_state_bwd_dx, _chunk_scan_bwd_dcb, _ddAcs_stable
#   "dcb_ddA"  the last two as one kernel (models/ssd_bwd_kernel.py)
#   "all"      all three as one kernel (models/ssd_bwd_fused.py)
# "none" until benchmarks/ssd_backward.py shows another faster on the GPU; the environment
# variable chooses for whole-step benchmarks (device_call.sh parts prof2ssdf, prof2ssda)
FUSED_CHOICES = ("none", "dcb_ddA", "all")
# The forward after the chunk cumsum and CB:
#   "mamba_ssm"  its chunk_state, state_passing and chunk_scan kernels
#   "fused"      one kernel of ours walking the chunks with the state on chip
#                (models/ssd_fwd_kernel.py; same formulas, fp32 sums in another order)
# "mamba_ssm" until benchmarks/ssd_backward.py --arms fwd shows the fused one faster on the GPU
FORWARD_CHOICES = ("mamba_ssm", "fused")


def _env_choice(name: str, choices: tuple[str, ...]) -> str:
    """The environment's choice of ``name`` (the first of ``choices`` when unset), checked."""
    value = os.environ.get(name, choices[0])
    if value not in choices:
        raise SSDKernelError(f"{name}={value!r}: use one of {', '.join(choices)}")
    return value


fused_kernels = _env_choice("MAMBA_TRAIN_SSD_FUSED", FUSED_CHOICES)
forward_kernels = _env_choice("MAMBA_TRAIN_SSD_FORWARD", FORWARD_CHOICES)


class ForwardKept(NamedTuple):
    """What the forward leaves for the backward (all fp32)."""
    dt: torch.Tensor         # softplus(Δ + bias), clamped: (batch, nheads, nchunks, chunk)
    dA_cumsum: torch.Tensor  # chunk-local cumulative A·Δ: (batch, nheads, nchunks, chunk)
    states: torch.Tensor     # state entering each chunk: (batch, nchunks, nheads, headdim, d_state)
    CB: torch.Tensor         # Cᵢ·Bⱼ within each chunk: (batch, nchunks, ngroups, chunk, chunk)


def ssd_forward(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None,
                seq_idx=None, dt_softplus=False, dt_limit=NO_DT_LIMIT):
    """mamba_ssm's SSD forward (same arguments as ``_mamba_chunk_scan_combined_fwd``, no
    ``cu_seqlens``). Returns ``(out, out_x, final_states, kept)``: out_x is the output before the
    ``z`` gate (None without z), final_states fp32 (batch, nheads, headdim, d_state)."""
    up = upstream()
    d_state = B.shape[-1]
    # the layouts mamba_ssm's kernels accept (same rules as its forward)
    B = B if B.stride(-1) == 1 else B.contiguous()
    C = C if C.stride(-1) == 1 else C.contiguous()
    x = x if 1 in (x.stride(-1), x.stride(1)) else x.contiguous()
    if z is not None and 1 not in (z.stride(-1), z.stride(1)):
        z = z.contiguous()
    if D is not None and D.stride(-1) != 1:
        D = D.contiguous()
    dA_cumsum, dt = up._chunk_cumsum_fwd(dt, A, chunk_size, dt_bias=dt_bias,
                                         dt_softplus=dt_softplus, dt_limit=dt_limit)
    if forward_kernels == "fused":
        from mamba_train.models.ssd_fwd_kernel import ssd_fwd_fused
        CB = up._bmm_chunk_fwd(C, B, chunk_size, seq_idx=seq_idx, output_dtype=torch.float32)
        out, out_x, states, final_states = ssd_fwd_fused(
            x, dt, dA_cumsum, CB, B, C, D=D, z=z, initial_states=initial_states, seq_idx=seq_idx)
        return out, out_x, final_states, ForwardKept(dt, dA_cumsum, states, CB)
    chunk_states = up._chunk_state_fwd(B, x, dt, dA_cumsum, seq_idx=seq_idx, states_in_fp32=True)
    flat = lambda t: None if t is None else rearrange(t, "... p n -> ... (p n)")  # noqa: E731
    states, final_states = up._state_passing_fwd(
        flat(chunk_states), dA_cumsum[:, :, :, -1], initial_states=flat(initial_states),
        seq_idx=seq_idx, chunk_size=chunk_size, out_dtype=torch.float32)
    states, final_states = (rearrange(t, "... (p n) -> ... p n", n=d_state)
                            for t in (states, final_states))
    CB = up._bmm_chunk_fwd(C, B, chunk_size, seq_idx=seq_idx, output_dtype=torch.float32)
    out, out_x = up._chunk_scan_fwd(CB, x, dt, dA_cumsum, C, states, D=D, z=z, seq_idx=seq_idx)
    return out, out_x, final_states, ForwardKept(dt, dA_cumsum, states, CB)


def ssd_backward(dout, x, dt_in, A, B, C, out, kept: ForwardKept, chunk_size, D=None, z=None,
                 dt_bias=None, initial_states=None, dfinal_states=None, seq_idx=None,
                 dt_softplus=False, dt_limit=NO_DT_LIMIT, dx=None, ddt=None, dB=None, dC=None,
                 dz=None, recompute_output=False):
    """mamba_ssm's SSD backward on the forward's ``kept`` tensors (same arguments and returns as
    ``_mamba_chunk_scan_combined_bwd``; ``dt_in`` is the Δ the forward was given, ``out`` its
    ``out_x`` when z was given, else its output). Gradients go into dx / ddt / dB / dC / dz when
    those are given (views into one buffer in the fused mixer)."""
    up = upstream()
    dout = dout if dout.stride(-1) == 1 else dout.contiguous()
    ngroups, d_state = B.shape[2:]
    dt, dA_cumsum, states, CB = kept
    dB_out = torch.empty_like(B) if dB is None else dB
    dC_out = torch.empty_like(C) if dC is None else dC
    ddt_out = torch.empty_like(dt_in) if ddt is None else ddt
    outz = out
    if z is not None:
        dz, dout, dD, *rest = up._chunk_scan_bwd_dz(x, z, out, dout, chunk_size=chunk_size,
                                                     has_ddAcs=False, D=D, dz=dz,
                                                     recompute_output=recompute_output)
        outz = rest[0] if recompute_output else out
    else:
        dz = None
    # gradient of the state entering each chunk, then passed back through the chunks; the
    # states and their gradients are rounded to x's dtype for the matmuls that follow
    dstates = up._chunk_scan_bwd_dstates(C, dA_cumsum, dout, seq_idx=seq_idx, dtype=states.dtype)
    flat = lambda t: None if t is None else rearrange(t, "... p n -> ... (p n)")  # noqa: E731
    dstates, ddA_chunk_cumsum, dinitial_states, states = up._state_passing_bwd(
        flat(states), dA_cumsum[:, :, :, -1], flat(dstates), dfinal_states=flat(dfinal_states),
        seq_idx=seq_idx, has_initial_states=initial_states is not None, dstates_dtype=x.dtype,
        states_dtype=x.dtype, chunk_size=chunk_size)
    unflat = lambda t: None if t is None else rearrange(t, "... (p n) -> ... p n", n=d_state)  # noqa: E731
    states, dstates, dinitial_states = unflat(states), unflat(dstates), unflat(dinitial_states)
    ddA_intra = None
    if fused_kernels == "all":
        from mamba_train.models.ssd_bwd_fused import chunk_scan_bwd_fused
        dx, ddt, dD_from_x, dCB, ddA_intra = chunk_scan_bwd_fused(
            x, dt, dA_cumsum, B, CB, dout, dstates, D=D, seq_idx=seq_idx, dx=dx)
    else:
        dx, ddt, dD_from_x = up._chunk_scan_chunk_state_bwd_dx(
            x, dt, dA_cumsum, B, CB, dout, dstates, D=D, seq_idx=seq_idx, dx=dx)
    dB, ddA_next = up._chunk_state_bwd_db(x, dt, dA_cumsum, dstates, seq_idx=seq_idx, B=B,
                                          ngroups=ngroups)
    dC, ddA_cumsum_prev = up._chunk_scan_bwd_dC(states.to(x.dtype), dA_cumsum, dout,
                                                seq_idx=seq_idx, C=C, ngroups=ngroups)
    if fused_kernels == "dcb_ddA":
        from mamba_train.models.ssd_bwd_kernel import chunk_scan_bwd_dcb_ddA
        dCB, ddA_intra = chunk_scan_bwd_dcb_ddA(x, dt, dA_cumsum, dout, CB, seq_idx=seq_idx)
    elif fused_kernels == "none":
        dCB = up._chunk_scan_bwd_dcb(x, dt, dA_cumsum, dout, seq_idx=seq_idx, ngroups=ngroups)
    dCB = dCB.to(CB.dtype)
    up._bmm_chunk_bwd(C, dCB, residual=dB, out=dB_out)
    up._bmm_chunk_bwd(B, rearrange(dCB, "... l s -> ... s l"), residual=dC, out=dC_out)
    if z is None:  # with z, _chunk_scan_bwd_dz's fp32 dD is the accurate one
        dD = dD_from_x
    # d(dA_cumsum): the state-passing term enters at each chunk's last position and is summed
    # backwards through the chunk (a reverse cumsum), plus the intra-chunk terms
    # (fp32 sums in mamba_ssm's order, so the result is bit-identical)
    ddA_cumsum_prev[..., -1] += ddA_chunk_cumsum
    ddA_prev = ddA_cumsum_prev.flip([-1]).cumsum(dim=-1).flip([-1])
    ddA = (ddA_intra if ddA_intra is not None
           else up._chunk_scan_bwd_ddAcs_stable(x, dt, dA_cumsum, dout, CB))
    ddA += ddA_next + ddA_prev
    ddt_out, dA, ddt_bias = up._chunk_cumsum_bwd(ddA, ddt, dt_in, A, dt_bias=dt_bias,
                                                 dt_softplus=dt_softplus, dt_limit=dt_limit,
                                                 ddt=ddt_out)
    grads = (dx, ddt_out, dA, dB_out, dC_out, dD, dz, ddt_bias, dinitial_states)
    return (*grads, outz) if recompute_output else grads


class SSDChunkScan(torch.autograd.Function):
    """``mamba_chunk_scan_combined`` (no varlen states) with the forward's tensors kept for the
    backward; same arguments, same outputs."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None,
                seq_idx=None, dt_softplus=False, dt_limit=NO_DT_LIMIT, return_final_states=False):
        out, out_x, final_states, kept = ssd_forward(
            x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias, initial_states=initial_states,
            seq_idx=seq_idx, dt_softplus=dt_softplus, dt_limit=dt_limit)
        ctx.save_for_backward(out if z is None else out_x, x, dt, A, B, C, D, z, dt_bias,
                              initial_states, seq_idx, *kept)
        ctx.settings = dict(chunk_size=chunk_size, dt_softplus=dt_softplus, dt_limit=dt_limit)
        ctx.return_final_states = return_final_states
        return (out, final_states) if return_final_states else out

    @staticmethod
    def backward(ctx, dout, *rest):
        out, x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, *kept = ctx.saved_tensors
        dfinal_states = rest[0] if ctx.return_final_states else None
        dx, ddt, dA, dB, dC, dD, dz, ddt_bias, dinitial_states = ssd_backward(
            dout, x, dt, A, B, C, out, ForwardKept(*kept), D=D, z=z, dt_bias=dt_bias,
            initial_states=initial_states, dfinal_states=dfinal_states, seq_idx=seq_idx,
            **ctx.settings)
        return (dx, ddt, dA, dB, dC, None, dD, dz, ddt_bias, dinitial_states,
                None, None, None, None)


def ssd_chunk_scan(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None,
                   seq_idx=None, dt_softplus=False, dt_limit=NO_DT_LIMIT,
                   return_final_states=False):
    """Drop-in for ``mamba_ssm``'s ``mamba_chunk_scan_combined`` (without ``cu_seqlens``)."""
    return SSDChunkScan.apply(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx,
                              dt_softplus, dt_limit, return_final_states)
