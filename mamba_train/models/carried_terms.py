"""The incoming-state terms of the fused mixers under a carry, in PyTorch.

The GPU kernels scan each slice from a zero state; what the state entering the slice adds is
linear in it and is computed here (the maths of ``models/state_passing.py``). Each term is
recomputed in the backward (``torch.utils.checkpoint``) so that only its inputs stay alive: the
(tokens x heads x state) tensors it builds exist one at a time, never for the whole slice.

* Mamba-1 (``selective_scan_fn`` takes no initial state and its final state has no gradient):
  :func:`selective_scan_summary` -- the slice's final state from zero and its whole-slice decay --
  and :func:`selective_scan_incoming_output`, the contribution ``C_t . (exp(A * cumsum dt)_t *
  h_in)``; both per channel and state, so they run over chunks of tokens.
* Mamba-3: :func:`mamba3_final_angle` (the RoPE angle the slice adds) and
  :func:`mamba3_incoming_output`, ``exp(cumsum A dt)_t (q_t . h_in)`` with ``q_t`` rotated by the
  global angle. Mamba-2's term is the reference's ``ssd_state_output``.

Shapes follow the kernels' layouts (documented per function). Everything is computed in fp32
(fp64 for fp64 inputs) with autocast off, as the scans themselves.
"""

from __future__ import annotations

import math

import torch

from mamba_train.models.reference.common import _compute_dtype, _no_autocast, recomputed
from mamba_train.models.reference.mamba3_ops import TWO_PI, rotate_pairs

# tokens per chunk of the Mamba-1 terms: about this many (batch x channel x state) fp32 values
_CHUNK_ELEMENTS = 1 << 24


def _token_chunk(batch: int, dim: int, dstate: int, seqlen: int) -> int:
    per_token = max(1, batch * dim * dstate)
    return max(1, min(seqlen, _CHUNK_ELEMENTS // per_token))


# --------------------------------------------------------------------------------------- Mamba-1
def _summary_part(u, delta, after, B, A):
    w = torch.exp(after.unsqueeze(2) * A[:, :, None])  # (b, d, n, T): decay to the slice end
    return torch.einsum("bdnt,bdt,bnt->bdn", w, delta * u, B)


def selective_scan_summary(u, delta, A, B):
    """The Mamba-1 slice's (final state from a zero state, whole-slice decay), each (b, d, n).

    u: (b, d, l) conv output; delta: (b, d, l) after bias and softplus; A: (d, n) (negative);
    B: (b, n, l). final = sum_s exp(A * (delta_{s+1} + ... + delta_{l-1})) delta_s u_s B_s;
    decay = exp(A * sum_s delta_s). The suffix sums are summed from the end (no differences of
    large prefix sums)."""
    cdt = _compute_dtype(u.dtype)
    with _no_autocast(u):
        u, delta, A, B = u.to(cdt), delta.to(cdt), A.to(cdt), B.to(cdt)
        suffix = torch.cumsum(delta.flip(-1), -1).flip(-1)  # delta_s + ... + delta_{l-1}
        after = torch.nn.functional.pad(suffix[..., 1:], (0, 1))  # delta_{s+1} + ...
        decay = torch.exp(suffix[..., :1] * A)  # (b, d, n)
        batch, dim, seqlen = u.shape
        step = _token_chunk(batch, dim, A.shape[-1], seqlen)
        final = None
        for t0 in range(0, seqlen, step):
            sl = slice(t0, t0 + step)
            part = recomputed(_summary_part, u[..., sl], delta[..., sl], after[..., sl],
                               B[..., sl], A)
            final = part if final is None else final + part
    return final, decay


def _incoming_part(C, cum, A, h_in):
    w = torch.exp(cum.unsqueeze(2) * A[:, :, None])  # (b, d, n, T): decay since the slice start
    return torch.einsum("bdnt,bdn,bnt->bdt", w, h_in, C)


def selective_scan_incoming_output(C, delta, A, h_in):
    """What the state h_in (b, d, n) entering a Mamba-1 slice adds to its outputs, before the
    skip and the gate: (b, d, l), ``y_t = sum_n C_t[n] exp(A[:, n] (delta_0 + ... + delta_t))
    h_in[:, n]``. C: (b, n, l); delta, A as in :func:`selective_scan_summary`."""
    cdt = _compute_dtype(h_in.dtype)
    with _no_autocast(h_in):
        C, delta, A = C.to(cdt), delta.to(cdt), A.to(cdt)
        cum = torch.cumsum(delta, -1)
        batch, dim, seqlen = delta.shape
        step = _token_chunk(batch, dim, A.shape[-1], seqlen)
        parts = [recomputed(_incoming_part, C[..., t0:t0 + step], cum[..., t0:t0 + step], A,
                             h_in)
                 for t0 in range(0, seqlen, step)]
    return torch.cat(parts, dim=-1)


# --------------------------------------------------------------------------------------- Mamba-3
def _last_segment(start: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """(b, l): 1 on the tokens from the slice's last document start on (all without one)."""
    if start is None:
        return torch.ones(like.shape[0], like.shape[1], dtype=like.dtype, device=like.device)
    count = torch.cumsum(start.int(), dim=1)
    return (count == count[:, -1:]).to(like.dtype)


def mamba3_final_angle(angles, DT, start):
    """The RoPE angle at the slice's last token, counted from the slice start (or from its last
    document start): (b, h, s), reduced mod 2*pi. angles: (b, l, s) raw angles (shared by the
    heads, as mamba_ssm's Mamba3 projects them); DT: (b, h, l); start: (b, l) bool or None."""
    cdt = _compute_dtype(DT.dtype)
    with _no_autocast(DT):
        rate = torch.tanh(angles.to(cdt)) * _last_segment(start, angles)[..., None]
        total = torch.einsum("bls,bhl->bhs", rate, DT.to(cdt)) * math.pi
    return torch.remainder(total, TWO_PI)


def _mamba3_incoming(Q, Q_bias, angles, DT, log_a, theta_in, h_in):
    nheads = Q_bias.shape[0]
    q = Q.repeat_interleave(nheads // Q.shape[2], dim=2) + Q_bias  # (b, l, h, n)
    step = torch.tanh(angles).unsqueeze(2) * (math.pi * DT.transpose(1, 2)).unsqueeze(-1)
    # the angle from the sequence start; past a document start the weight below is 0 anyway
    theta = torch.remainder(torch.cumsum(step, dim=1) + theta_in.unsqueeze(1), TWO_PI)
    w = torch.exp(torch.cumsum(log_a, dim=1))  # (b, l, h)
    return torch.einsum("blhn,bhpn->blhp", rotate_pairs(q, theta), h_in) * w.unsqueeze(-1)


def mamba3_incoming_output(Q, Q_bias, angles, DT, log_a, theta_in, h_in):
    """What the SSM state h_in (b, h, p, n) entering a Mamba-3 slice adds to its outputs before
    the skip and the gate: (b, l, h, p), ``exp(log_a_0 + ... + log_a_t) q_t . h_in`` with
    ``q_t = rot(theta_in + angle since the slice start, Q_t + Q_bias)``.

    Q: (b, l, g, n) (C after its norm, before the bias); Q_bias: (h, n); angles: (b, l, s) raw;
    DT: (b, h, l); log_a: (b, l, h) = A*dt, -inf where a document starts (the carry's
    ``doc_starts``, position 0 included); theta_in: (b, h, s) the angle entering the slice."""
    cdt = _compute_dtype(h_in.dtype)
    with _no_autocast(h_in):
        return recomputed(_mamba3_incoming, Q.to(cdt), Q_bias.to(cdt), angles.to(cdt),
                           DT.to(cdt), log_a.to(cdt), theta_in.to(cdt), h_in)
