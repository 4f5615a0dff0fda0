"""Pure-PyTorch reference ops for Mamba-1 / Mamba-2, with the tensor layouts of ``mamba_ssm``.

These are the oracle that the fused GPU kernels are checked against, and the CPU training path.
They follow ``mamba_ssm`` 2.3.2 operation by operation:

* ``causal_conv1d``   -- ``causal_conv1d_fn``: depthwise causal conv over (b, d, l), fp32 accumulation,
  optional SiLU, optional ``seq_idx`` (no mixing across document boundaries);
* ``selective_scan``  -- ``selective_scan_fn`` / ``selective_scan_ref`` (Mamba-1);
* ``ssd_chunked``     -- ``mamba_chunk_scan_combined`` (Mamba-2 state-space duality, chunked);
* ``gated_rms_norm``  -- ``layernorm_gated.rmsnorm_fn`` (group_size, norm_before_gate);
* ``selective_scan_sequential`` / ``ssd_sequential`` -- the plain token-by-token recurrences. They
  are the naive oracle for the tests only (a Python loop per token: far too slow to train with).

Precision: whatever the input dtype, the recurrence state and all decays are computed in fp32 (fp64
when the inputs are fp64), with autocast disabled inside the ops, exactly like the kernels; results
come back in the dtype of the main input (``u`` / ``x``).

``seq_idx`` (int32, (batch, seqlen), non-decreasing document numbers) makes the state restart at
every position where it changes: packed documents give the same outputs as separate runs.

Numerics: decays are only ever formed as ``exp`` of non-positive segment sums (or products of
factors in [0, 1]), never as ``exp(+cumsum) * exp(-cumsum)``, so long or fast-decaying sequences
cannot overflow.

One file over the project's ~400-line guideline on purpose: these ops are the exactness oracle,
checked line by line against mamba_ssm's; splitting them would scatter that one-to-one reading.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

__all__ = [
    "causal_conv1d",
    "selective_scan",
    "ssd_chunked",
    "gated_rms_norm",
    "selective_scan_sequential",
    "ssd_sequential",
    "segsum",
]


# --------------------------------------------------------------------------------------- helpers
def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half/bf16/fp32 inputs, fp64 for fp64 inputs (the tests' exact mode)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _skip_and_gate(y: torch.Tensor, x: torch.Tensor, D: torch.Tensor | None,
                   z: torch.Tensor | None, cdt: torch.dtype) -> torch.Tensor:
    """The scans' epilogue: the skip ``y + D x`` (D shaped to broadcast against x), then the
    gate ``y * silu(z)``; shared by the chunked scans and their sequential oracles."""
    if D is not None:
        y = y + x * D.to(cdt)
    if z is not None:
        y = y * F.silu(z.to(cdt))
    return y


def _ssd_skip_weight(D: torch.Tensor | None) -> torch.Tensor | None:
    """SSD's D is per head (h,) or per head and channel (h, p); x is (b, l, h, p)."""
    return D if D is None or D.dim() == 2 else D[:, None]


def _no_autocast(t: torch.Tensor):
    """Autocast would push the einsums/matmuls of the state math back to bf16: switch it off."""
    device_type = t.device.type
    if device_type not in ("cpu", "cuda", "xpu", "mps", "hpu"):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, enabled=False)


def _doc_start_mask(seq_idx: torch.Tensor | None, seqlen: int) -> torch.Tensor | None:
    """(batch, seqlen) bool: True where a new document starts (seq_idx differs from the previous
    position). Position 0 is False: the state is zero there anyway."""
    if seq_idx is None:
        return None
    if seq_idx.shape[-1] != seqlen:
        raise ValueError(f"seq_idx has length {seq_idx.shape[-1]}, expected {seqlen}")
    start = torch.zeros(seq_idx.shape, dtype=torch.bool, device=seq_idx.device)
    start[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    return start


# --------------------------------------------------------------------------------- causal conv1d
def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  seq_idx: torch.Tensor | None = None, activation: str | None = "silu") -> torch.Tensor:
    """Depthwise causal convolution, ``causal_conv1d_fn`` semantics.

    x: (batch, dim, seqlen); weight: (dim, width) or (dim, 1, width) (``nn.Conv1d`` layout);
    bias: (dim,) or None; seq_idx: (batch, seqlen) int or None; activation: "silu"/"swish"/None.
    out[t] = bias + sum_k weight[k] * x[t - (width-1) + k], taps before the sequence start (or, with
    seq_idx, in another document) count as zero. Accumulates in fp32, returns x.dtype.
    """
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"activation must be None, 'silu' or 'swish', got {activation!r}")
    if weight.dim() == 3:
        weight = weight.squeeze(1)
    dim, width = weight.shape
    if x.dim() != 3 or x.shape[1] != dim:
        raise ValueError(f"x must be (batch, {dim}, seqlen), got {tuple(x.shape)}")
    seqlen = x.shape[-1]
    cdt = _compute_dtype(x.dtype)
    with _no_autocast(x):
        xf = x.to(cdt)
        w = weight.to(cdt)
        out = xf * w[:, width - 1, None]  # lag 0
        for lag in range(1, min(width, seqlen)):
            tap = xf[..., :-lag] * w[:, width - 1 - lag, None]
            if seq_idx is not None:
                same_doc = (seq_idx[:, lag:] == seq_idx[:, :-lag]).unsqueeze(1)
                tap = tap * same_doc.to(cdt)
            out = out + F.pad(tap, (lag, 0))
        if bias is not None:
            out = out + bias.to(cdt)[:, None]
        if activation is not None:
            out = F.silu(out)
    return out.to(x.dtype)


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


def ssd_state_output(C, log_a, h0):
    """The output that an initial state h0 (b, h, p, n) adds to an SSD scan: exp(log_a_0 + ... +
    log_a_t) C_t . h0, with C (b, l, g, n) and log_a (b, l, h) as in ``_ssd_core`` (-inf at a
    document start: nothing passes it). Returns (b, l, h, p)."""
    hpg = log_a.shape[-1] // C.shape[-2]
    w = torch.exp(torch.cumsum(log_a, dim=1))  # non-positive prefix sums: no overflow
    Ch = C.repeat_interleave(hpg, dim=2) if hpg > 1 else C
    return torch.einsum("blhn,bhpn->blhp", Ch, h0) * w.unsqueeze(-1)


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


# ------------------------------------------------------------------------------ gated RMSNorm
def gated_rms_norm(x, weight, z=None, eps: float = 1e-6, group_size: int | None = None,
                   norm_before_gate: bool = True, bias=None):
    """``layernorm_gated.rmsnorm_fn``: RMSNorm over groups of ``group_size`` channels, gated by z.

    norm_before_gate=True: rmsnorm(x) * weight * silu(z); False: rmsnorm(x * silu(z)) * weight.
    group_size=None means one group over the whole last dimension. fp32 math, returns x.dtype.
    """
    cdt = _compute_dtype(x.dtype)
    N = x.shape[-1]
    gs = N if group_size is None else int(group_size)
    if N % gs:
        raise ValueError(f"group_size={gs} must divide the normalised dimension {N}")
    with _no_autocast(x):
        xf = x.to(cdt)
        gate = F.silu(z.to(cdt)) if z is not None else None
        if gate is not None and not norm_before_gate:
            xf = xf * gate
        xg = xf.unflatten(-1, (N // gs, gs))
        rstd = torch.rsqrt(xg.square().mean(dim=-1, keepdim=True) + eps)
        out = (xg * rstd).flatten(-2) * weight.to(cdt)
        if bias is not None:
            out = out + bias.to(cdt)
        if gate is not None and norm_before_gate:
            out = out * gate
    return out.to(x.dtype)


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
