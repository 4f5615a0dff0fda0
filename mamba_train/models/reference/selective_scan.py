"""Mamba-1's selective scan in pure PyTorch (``mamba_ssm``'s ``selective_scan_fn`` /
``selective_scan_ref``), chunked with a custom backward, and its token-by-token oracle.

``selective_scan_sequential`` is a Python loop per token: the naive oracle for the tests only.
Precision and ``seq_idx`` conventions: ``reference.common``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from mamba_train.models.reference.common import (
    _compute_dtype, _doc_start_mask, _no_autocast, _skip_and_gate)

__all__ = ["selective_scan", "selective_scan_sequential"]


# ------------------------------------------------------------------------- Mamba-1 selective scan
def _linear_scan(a: torch.Tensor, v: torch.Tensor, reverse: bool = False):
    """Inclusive scan of h_t = a_t * h_{t-1} + v_t along dim 0 (Hillis-Steele, log2(T) steps).

    Returns (h, P) with h the scan from a zero initial state and P_t = a_1 * ... * a_t the decay
    applied to an initial state (so the full state is h + P * h_init). With ``reverse`` it runs
    from the end: h_t = v_t + a_t * h_{t+1}, P_t = a_t * ... * a_{T-1}. Only products of the
    factors a (in [0, 1]) are formed: no overflow, no cancellation.
    """
    T = a.shape[0]
    k = 1
    while k < T:
        v_new = torch.empty_like(v)
        a_new = torch.empty_like(a)
        if not reverse:
            v_new[:k] = v[:k]
            torch.addcmul(v[k:], a[k:], v[:-k], out=v_new[k:])
            a_new[:k] = a[:k]
            torch.mul(a[k:], a[:-k], out=a_new[k:])
        else:
            v_new[T - k:] = v[T - k:]
            torch.addcmul(v[:-k], a[:-k], v[k:], out=v_new[:-k])
            a_new[T - k:] = a[T - k:]
            torch.mul(a[:-k], a[k:], out=a_new[:-k])
        a, v = a_new, v_new
        k *= 2
    return v, a


def _scan_chunk_size(batch: int, dim: int, dstate: int) -> int:
    """Tokens per chunk: keep the (T, batch, dim, dstate) working set around 1 MiB (cache-sized),
    with at least 8 tokens so that the Python loop over chunks stays cheap."""
    target = (1 << 18) // max(1, batch * dim * dstate)
    return int(min(64, max(8, 1 << max(0, target.bit_length() - 1))))


class _SelectiveScanCore(torch.autograd.Function):
    """y_t = C_t . h_t,  h_t = exp(delta_t A) * keep_t * h_{t-1} + delta_t u_t B_t  (zero h_{-1}).

    Time-major layout: u, delta (L, b, g, dg); A (g, dg, n); B, C (L, b, g, n); keep (L, b) or None.
    Forward: chunks of T tokens, a Hillis-Steele scan inside each chunk, the state carried across
    chunks; only the inputs and the chunk-start states (b*d*n per chunk) are saved. Backward:
    chunks in reverse, recomputing the chunk's states and running the adjoint (reverse) scan, so
    the working memory is O(b*d*n*T) -- the kernel's recompute strategy.
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C, keep, chunk, h0=None):
        L, b, g, dg = u.shape
        n = A.shape[-1]
        y = torch.empty_like(u)
        h = u.new_zeros(b, g, dg, n) if h0 is None else h0.to(u.dtype)
        starts = []
        for c0 in range(0, L, chunk):
            sl = slice(c0, c0 + chunk)
            a, v = _chunk_inputs(u[sl], delta[sl], A, B[sl], None if keep is None else keep[sl])
            hs, decay = _linear_scan(a, v)
            hs.addcmul_(decay, h)
            y[sl] = torch.matmul(hs, C[sl].unsqueeze(-1)).squeeze(-1)
            starts.append(h)
            h = hs[-1].clone()  # a view would keep every chunk's states alive
        ctx.chunk = chunk
        ctx.has_h0 = h0 is not None
        ctx.save_for_backward(u, delta, A, B, C, keep, torch.stack(starts))
        return y, h

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, dh_final):
        with _no_autocast(dy):  # backward() may be called inside an autocast region
            return _SelectiveScanCore._backward(ctx, dy, dh_final)

    @staticmethod
    def _backward(ctx, dy, dh_final):
        u, delta, A, B, C, keep, starts = ctx.saved_tensors
        chunk = ctx.chunk
        L, b, g, dg = u.shape
        dy = dy.contiguous()
        du = torch.empty_like(u)
        ddelta = torch.empty_like(delta)
        dB = torch.empty_like(B)
        dC = torch.empty_like(C)
        dA = torch.zeros_like(A)
        # a_{t+1} * dh_{t+1} for the first token of the following chunk; for the last chunk,
        # the gradient of the final state (it enters dh at the last token undecayed)
        carry = dh_final
        n_chunks = len(range(0, L, chunk))
        for ci in reversed(range(n_chunks)):
            c0 = ci * chunk
            sl = slice(c0, c0 + chunk)
            u_c, dl_c, B_c, C_c, dy_c = u[sl], delta[sl], B[sl], C[sl], dy[sl]
            h0 = starts[ci]
            a, v = _chunk_inputs(u_c, dl_c, A, B_c, None if keep is None else keep[sl])
            hs, decay = _linear_scan(a, v)
            hs.addcmul_(decay, h0)
            # adjoint: dh_t = C_t dy_t + a_{t+1} dh_{t+1}
            r = dy_c.unsqueeze(-1) * C_c.unsqueeze(-2)
            a_next = torch.cat([a[1:], torch.ones_like(a[:1])])
            dh, decay_rev = _linear_scan(a_next, r, reverse=True)
            if carry is not None:
                dh.addcmul_(decay_rev, carry)
            carry = a[0] * dh[0]
            # a_t = exp(delta_t A) * keep_t: d/d(delta_t A) = dh_t * h_{t-1} * a_t
            h_prev = torch.cat([h0.unsqueeze(0), hs[:-1]])
            q = dh * h_prev * a
            dA += torch.einsum("tbgdn,tbgd->gdn", q, dl_c)
            dh_B = torch.matmul(dh, B_c.unsqueeze(-1)).squeeze(-1)  # sum_n dh * B  (T, b, g, dg)
            ddelta[sl] = (q * A).sum(-1) + u_c * dh_B
            du[sl] = dl_c * dh_B
            # v_t = delta_t u_t B_t: dB sums over the channels of the group
            dB[sl] = torch.matmul((dl_c * u_c).unsqueeze(-2), dh).squeeze(-2)
            dC[sl] = torch.matmul(dy_c.unsqueeze(-2), hs).squeeze(-2)
        # the initial state enters h_0 through the first token's decay a_0
        return du, ddelta, dA, dB, dC, None, None, carry if ctx.has_h0 else None


def _chunk_inputs(u, delta, A, B, keep):
    """Per-token decay factors a = exp(delta A) (zeroed at document starts) and inputs delta u B."""
    a = torch.exp(delta.unsqueeze(-1) * A)
    if keep is not None:
        a = a * keep[:, :, None, None, None]
    v = (delta * u).unsqueeze(-1) * B.unsqueeze(-2)
    return a, v


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   seq_idx=None, chunk_size: int | None = None, carry=None):
    """Mamba-1 selective scan, ``mamba_ssm.ops.selective_scan_interface.selective_scan_fn`` layout.

    u, delta: (batch, dim, seqlen); A: (dim, dstate) real; B, C: (batch, dstate, seqlen) or
    (batch, ngroups, dstate, seqlen); D: (dim,); z: (batch, dim, seqlen); delta_bias: (dim,);
    seq_idx: (batch, seqlen) int or None. Returns (batch, dim, seqlen) in u.dtype:

        delta = softplus(delta + delta_bias)            (softplus only if delta_softplus)
        h_t   = exp(delta_t A) h_{t-1} + delta_t B_t u_t  (h reset to 0 where seq_idx changes)
        y_t   = C_t . h_t + D u_t;   y *= silu(z)

    chunk_size: tokens per chunk of the vectorised scan (None: picked from the sizes); it changes
    speed and memory only, not the result.
    carry: a ``models.state_passing.SequenceCarry`` when this is a slice of a longer sequence: the
    state entering the slice comes from it (the scan runs from a zero state, then adds the exact
    contribution ``C_t . (P_t * h_in)`` of the incoming state, P_t the decay since the slice start).
    """
    if A.is_complex():
        raise NotImplementedError("complex A is not supported by the reference selective scan")
    if B.dim() < 3 or C.dim() < 3:
        raise NotImplementedError("only input-dependent B and C ((b, n, l) or (b, g, n, l))")
    batch, dim, seqlen = u.shape
    dstate = A.shape[-1]
    cdt = _compute_dtype(u.dtype)
    if B.dim() == 3:
        B = B.unsqueeze(1)
    if C.dim() == 3:
        C = C.unsqueeze(1)
    ngroups = B.shape[1]
    if C.shape[1] != ngroups or dim % ngroups:
        raise ValueError(f"B/C groups ({B.shape[1]}, {C.shape[1]}) must divide dim={dim}")
    with _no_autocast(u):
        uf = u.to(cdt)
        dlt = delta.to(cdt)
        if delta_bias is not None:
            dlt = dlt + delta_bias.to(cdt)[:, None]
        if delta_softplus:
            dlt = F.softplus(dlt)
        start = (_doc_start_mask(seq_idx, seqlen) if carry is None
                 else carry.doc_starts(seq_idx, seqlen))
        keep = None if start is None else (~start).to(cdt).t().contiguous()  # (L, b)
        dg = dim // ngroups
        u_t = uf.permute(2, 0, 1).reshape(seqlen, batch, ngroups, dg)
        d_t = dlt.permute(2, 0, 1).reshape(seqlen, batch, ngroups, dg)
        B_t = B.to(cdt).permute(3, 0, 1, 2).contiguous()
        C_t = C.to(cdt).permute(3, 0, 1, 2).contiguous()
        A_g = A.to(cdt).reshape(ngroups, dg, dstate)
        chunk = chunk_size or _scan_chunk_size(batch, dim, dstate)
        y, h_last = _SelectiveScanCore.apply(u_t, d_t, A_g, B_t, C_t, keep, chunk)
        if carry is not None:
            # whole-slice decay exp(A * sum_t delta_t) per (d, n); 0 if a document starts inside
            decay = torch.exp(d_t.sum(0).unsqueeze(-1) * A_g)
            if keep is not None:
                decay = decay * keep.prod(0)[:, None, None, None]
            h_in = carry.carry("ssm", h_last, decay)
            # the incoming state's contribution: the same scan with zero input from h_in
            y_in, _ = _SelectiveScanCore.apply(torch.zeros_like(u_t), d_t, A_g, B_t, C_t, keep,
                                               chunk, h_in)
            y = y + y_in
        y = y.reshape(seqlen, batch, dim).permute(1, 2, 0)
        y = _skip_and_gate(y, uf, None if D is None else D[:, None], z, cdt)
    return y.to(u.dtype)


# ------------------------------------------------------------- sequential oracles (tests only)
def selective_scan_sequential(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                              delta_softplus=False, seq_idx=None):
    """Token-by-token Mamba-1 recurrence (same arguments as ``selective_scan``). Test oracle only."""
    cdt = _compute_dtype(u.dtype)
    batch, dim, seqlen = u.shape
    uf, dlt, Af = u.to(cdt), delta.to(cdt), A.to(cdt)
    if delta_bias is not None:
        dlt = dlt + delta_bias.to(cdt)[:, None]
    if delta_softplus:
        dlt = F.softplus(dlt)
    if B.dim() == 3:
        B = B.unsqueeze(1)
    if C.dim() == 3:
        C = C.unsqueeze(1)
    rep = dim // B.shape[1]
    Bd = B.to(cdt).repeat_interleave(rep, dim=1)  # (b, d, n, l)
    Cd = C.to(cdt).repeat_interleave(rep, dim=1)
    h = uf.new_zeros(batch, dim, Af.shape[-1])
    ys = []
    for t in range(seqlen):
        decay = torch.exp(dlt[:, :, t, None] * Af)
        if seq_idx is not None and t > 0:
            same = (seq_idx[:, t] == seq_idx[:, t - 1]).to(cdt)
            decay = decay * same[:, None, None]
        h = decay * h + (dlt[:, :, t] * uf[:, :, t])[:, :, None] * Bd[:, :, :, t]
        ys.append((h * Cd[:, :, :, t]).sum(-1))
    y = torch.stack(ys, dim=-1)
    y = _skip_and_gate(y, uf, None if D is None else D[:, None], z, cdt)
    return y.to(u.dtype)
