"""Mamba-2's state-space duality (SSD) in pure PyTorch: ``mamba_ssm``'s
``mamba_chunk_scan_combined`` chunked with a custom backward, the incoming-state terms the
context-parallel carry adds (``ssd_state_output`` / ``ssd_carry``), and the token-by-token oracle.

``ssd_sequential`` is a Python loop per token: the naive oracle for the tests only.
Precision and ``seq_idx`` conventions: ``reference.common``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from mamba_train.models.reference.common import (
    _compute_dtype, _doc_start_mask, _no_autocast, _skip_and_gate, recomputed)

__all__ = ["segsum", "ssd_chunked", "ssd_sequential", "ssd_state_output", "ssd_carry"]


def _ssd_skip_weight(D: torch.Tensor | None) -> torch.Tensor | None:
    """SSD's D is per head (h,) or per head and channel (h, p); x is (b, l, h, p)."""
    return D if D is None or D.dim() == 2 else D[:, None]

# ---------------------------------------------------------------------------- Mamba-2 SSD (chunked)
def segsum(x: torch.Tensor) -> torch.Tensor:
    """Stable segment sums: out[..., t, s] = x[..., s+1] + ... + x[..., t] for s <= t, -inf above.

    Built by a masked cumsum rather than cumsum differences, so -inf entries (document starts)
    propagate as -inf (exp -> 0) without producing NaN, and no precision is lost to cancellation.
    """
    T = x.shape[-1]
    rep = x.unsqueeze(-1).expand(*x.shape, T)
    strict = torch.ones(T, T, dtype=torch.bool, device=x.device).tril(-1)
    rep = rep.masked_fill(~strict, 0.0)
    out = torch.cumsum(rep, dim=-2)
    return out.masked_fill(~strict.logical_or(torch.eye(T, dtype=torch.bool, device=x.device)),
                           -math.inf)


def _prepare_dt(dt, dt_bias, dt_softplus, dt_limit, cdt):
    """dt -> softplus(dt + dt_bias) clamped to dt_limit, in fp32 (the kernels' _chunk_cumsum)."""
    dt = dt.to(cdt)
    if dt_bias is not None:
        dt = dt + dt_bias.to(cdt)
    if dt_softplus:
        dt = F.softplus(dt)  # threshold 20, like the kernel
    lo, hi = dt_limit
    return dt.clamp(min=lo, max=hi)


def _ssd_core(xdt, log_a, B, C, T):
    """y_t = sum_{s<=t} exp(log_a_{s+1} + ... + log_a_t) (C_t . B_s) xdt_s, by chunks of T tokens,
    and the state after the last token (b, h, p, n), both from a zero initial state.

    xdt: (b, l, h, p) = dt * x; log_a: (b, l, h) = dt * A (-inf at document starts);
    B, C: (b, l, g, n). Intra-chunk quadratic form with segsum, then the chunk-end states passed
    from chunk to chunk (a loop over chunks), then each chunk's entering-state contribution.
    """
    batch, seqlen, nheads, headdim = xdt.shape
    ngroups, dstate = B.shape[-2:]
    hpg = nheads // ngroups
    n_chunks = -(-seqlen // T)
    pad = n_chunks * T - seqlen
    if pad:  # padded tail: dt = 0, x = B = C = 0 -> no effect on the real tokens
        xdt = F.pad(xdt, (0, 0, 0, 0, 0, pad))
        log_a = F.pad(log_a, (0, 0, 0, pad))
        B = F.pad(B, (0, 0, 0, 0, 0, pad))
        C = F.pad(C, (0, 0, 0, 0, 0, pad))
    # chunked views: c = chunk, t/s = position in chunk, g = group, j = head in group
    xdt = xdt.reshape(batch, n_chunks, T, ngroups, hpg, headdim)
    Bc = B.reshape(batch, n_chunks, T, ngroups, dstate)
    Cc = C.reshape(batch, n_chunks, T, ngroups, dstate)
    la = log_a.reshape(batch, n_chunks, T, ngroups, hpg).permute(0, 3, 4, 1, 2)  # (b,g,j,c,t)
    decay = torch.exp(segsum(la))  # (b, g, j, c, t, s)
    cum = torch.cumsum(la, dim=-1)  # (b, g, j, c, t)
    # 1. intra-chunk (diagonal blocks): y_t = sum_{s<=t} (C_t.B_s) decay[t,s] dt_s x_s
    CB = torch.einsum("bctgn,bcsgn->bgcts", Cc, Bc)
    y = torch.einsum("bgcts,bgjcts,bcsgjp->bctgjp", CB, decay, xdt)
    # 2. state contributed by each chunk at its end
    states = torch.einsum("bcsgn,bgjcs,bcsgjp->bcgjpn", Bc, decay[..., -1, :], xdt)
    # 3. pass states between chunks (loop over chunks only)
    chunk_decay = torch.exp(cum[..., -1]).permute(0, 3, 1, 2)  # (b, c, g, j)
    entering = [torch.zeros_like(states[:, 0])]
    for c in range(n_chunks):  # the padded tail has decay 1 and no input: the last is exact
        entering.append(entering[-1] * chunk_decay[:, c, :, :, None, None] + states[:, c])
    final = entering.pop().reshape(batch, nheads, headdim, dstate)
    entering = torch.stack(entering, dim=1)  # state before each chunk, (b, c, g, j, p, n)
    # 4. contribution of the entering state: y_t += exp(cum_t) C_t . h_start
    y = y + torch.einsum("bctgn,bcgjpn,bgjct->bctgjp", Cc, entering, torch.exp(cum))
    return y.reshape(batch, n_chunks * T, nheads, headdim)[:, :seqlen], final


def _state_output(C, log_a, h0):
    batch, seqlen, ngroups, dstate = C.shape
    nheads, headdim = log_a.shape[-1], h0.shape[2]
    w = torch.exp(torch.cumsum(log_a, dim=1))  # non-positive prefix sums: no overflow
    heads = h0.reshape(batch, ngroups, nheads // ngroups, headdim, dstate)
    y = torch.einsum("blgn,bgjpn->blgjp", C, heads).reshape(batch, seqlen, nheads, headdim)
    return y * w.unsqueeze(-1)


def ssd_state_output(C, log_a, h0):
    """The output that an initial state h0 (b, h, p, n) adds to an SSD scan: exp(log_a_0 + ... +
    log_a_t) C_t . h0, with C (b, l, g, n) and log_a (b, l, h) as in ``_ssd_core`` (-inf at a
    document start: nothing passes it). Returns (b, l, h, p); recomputed in the backward, so only
    C, log_a and h0 stay alive."""
    return recomputed(_state_output, C, log_a, h0)


def ssd_carry(carry, y, final, C, log_a, extra_state=None):
    """Join an SSD slice to the sequence before it: hand ``carry`` this slice's final state from
    zero (plus ``extra_state``, a state entering before token 0 that is already known, carried
    to the end) and its whole-slice decay; add the incoming state's output to y."""
    decay = torch.exp(log_a.sum(1))  # (b, h); 0 where a document starts in the slice
    if extra_state is not None:
        final = final + decay[..., None, None] * extra_state
    h_in = carry.carry("ssm", final, decay)
    if extra_state is not None:
        h_in = h_in + extra_state
    return y + ssd_state_output(C, log_a, h_in)


class _SSDCore(torch.autograd.Function):
    """``_ssd_core`` with a recomputing backward: saves only its inputs (memory O(inputs), like
    the kernels), and differentiates with autocast off even when ``backward()`` is called inside
    an autocast region (autograd would otherwise run the einsum gradients in bf16)."""

    @staticmethod
    def forward(ctx, xdt, log_a, B, C, T):
        ctx.T = T
        ctx.save_for_backward(xdt, log_a, B, C)
        with torch.no_grad():
            return _ssd_core(xdt, log_a, B, C, T)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, dfinal):
        inputs = [t.detach().requires_grad_() for t in ctx.saved_tensors]
        with torch.enable_grad(), _no_autocast(dy):
            y, final = _ssd_core(*inputs, ctx.T)
            grads = torch.autograd.grad((y, final), inputs, (dy, dfinal))
        return (*grads, None)


def ssd_chunked(x, dt, A, B, C, chunk_size, D=None, dt_bias=None, dt_softplus=True, seq_idx=None,
                dt_limit=(0.0, float("inf")), z=None, carry=None):
    """Mamba-2 SSD, ``mamba_ssm.ops.triton.ssd_combined.mamba_chunk_scan_combined`` layout.

    x: (batch, seqlen, nheads, headdim); dt: (batch, seqlen, nheads); A: (nheads,);
    B, C: (batch, seqlen, ngroups, dstate); D: (nheads,) or (nheads, headdim); dt_bias: (nheads,);
    seq_idx: (batch, seqlen) int or None; z: (batch, seqlen, nheads, headdim) or None.
    Returns (batch, seqlen, nheads, headdim) in x.dtype:

        dt  = clamp(softplus(dt + dt_bias), *dt_limit)
        h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T     (per head; reset where seq_idx changes)
        y_t = h_t C_t + D x_t;   y *= silu(z)

    Computed chunk by chunk (intra-chunk quadratic form with segsum, states passed between chunks)
    in fp32; the backward recomputes the core instead of storing the (chunk x chunk) decay
    matrices. Any seqlen works (the last chunk is padded internally).
    carry: a ``models.state_passing.SequenceCarry`` when this is a slice of a longer sequence
    (the incoming state's exact contribution is added before the skip and gate).
    """
    batch, seqlen, nheads, headdim = x.shape
    ngroups, dstate = B.shape[-2:]
    if nheads % ngroups:
        raise ValueError(f"nheads={nheads} must be a multiple of ngroups={ngroups}")
    if int(chunk_size) <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    cdt = _compute_dtype(x.dtype)
    with _no_autocast(x):
        xf = x.to(cdt)
        dtf = _prepare_dt(dt, dt_bias, dt_softplus, dt_limit, cdt)  # (b, l, h)
        log_a = dtf * A.to(cdt)
        start = (_doc_start_mask(seq_idx, seqlen) if carry is None
                 else carry.doc_starts(seq_idx, seqlen))
        if start is not None:  # decay 0 (log -inf) where a document starts: the state restarts
            log_a = log_a.masked_fill(start.unsqueeze(-1), -math.inf)
        xdt = xf * dtf.unsqueeze(-1)
        y, final = _SSDCore.apply(xdt, log_a, B.to(cdt), C.to(cdt), int(chunk_size))
        if carry is not None:
            y = ssd_carry(carry, y, final, C.to(cdt), log_a)
        y = _skip_and_gate(y, xf, _ssd_skip_weight(D), z, cdt)
    return y.to(x.dtype)


def ssd_sequential(x, dt, A, B, C, D=None, dt_bias=None, dt_softplus=True, seq_idx=None,
                   dt_limit=(0.0, float("inf")), z=None):
    """Token-by-token Mamba-2 recurrence (same arguments as ``ssd_chunked`` minus chunk_size)."""
    cdt = _compute_dtype(x.dtype)
    batch, seqlen, nheads, headdim = x.shape
    xf = x.to(cdt)
    dtf = _prepare_dt(dt, dt_bias, dt_softplus, dt_limit, cdt)
    Af = A.to(cdt)
    rep = nheads // B.shape[2]
    Bh = B.to(cdt).repeat_interleave(rep, dim=2)  # (b, l, h, n)
    Ch = C.to(cdt).repeat_interleave(rep, dim=2)
    h = xf.new_zeros(batch, nheads, headdim, B.shape[-1])
    ys = []
    for t in range(seqlen):
        decay = torch.exp(dtf[:, t] * Af)  # (b, h)
        if seq_idx is not None and t > 0:
            decay = decay * (seq_idx[:, t] == seq_idx[:, t - 1]).to(cdt)[:, None]
        h = decay[:, :, None, None] * h + (dtf[:, t, :, None] * xf[:, t])[..., None] * Bh[:, t, :, None, :]
        ys.append((h * Ch[:, t, :, None, :]).sum(-1))
    y = torch.stack(ys, dim=1)
    y = _skip_and_gate(y, xf, _ssd_skip_weight(D), z, cdt)
    return y.to(x.dtype)
