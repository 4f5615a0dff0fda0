"""Mamba-3 SISO scan in pure PyTorch: a chunked form (training) and a per-token oracle (tests).

Both take the arguments of ``mamba_ssm.ops.triton.mamba3.mamba3_siso_combined`` in its layout,
so the fused backend and the reference differ only in this one call:

    Q, K: (batch, seqlen, ngroups, dstate)  -- C and B after their RMS norms, before the biases
    V:    (batch, seqlen, nheads, headdim)  -- x
    ADT, DT, Trap: (batch, nheads, seqlen)  -- A*dt (<= 0), dt (> 0), the trapezoid logit
    Q_bias, K_bias: (nheads, dstate);  Angles: (batch, seqlen, nheads, n_angles), raw (pre-tanh)
    D: (nheads,) or None;  Z: (batch, seqlen, nheads, headdim) or None (gate y * silu(z))

The recurrence (Mamba-3 paper §3, exponential-trapezoidal rule), per head, with
``lam_t = sigmoid(Trap_t)``, ``alpha_t = exp(ADT_t)`` and RoPE angle
``theta_t = theta_{t-1} + pi * tanh(Angles_t) * DT_t``:

    q_t = rot(theta_t, Q_t + Q_bias),  k_t = rot(theta_t, K_t + K_bias)
    h_t = alpha_t h_{t-1} + (1 - lam_t) DT_t alpha_t k_{t-1} v_{t-1}^T + lam_t DT_t k_t v_t^T
    y_t = h_t q_t + D v_t,  then y_t *= silu(z_t)

``rot`` turns consecutive pairs (0,1), (2,3), ... of the first ``2 * n_angles`` state channels
by the pair's angle and leaves the rest. ``seq_idx`` (batch, seqlen) restarts h, theta and the
previous-token term wherever the document number changes -- what the kernel's ``cu_seqlens``
does at each sequence start.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mamba_train.models.reference.common import (
    _compute_dtype,
    _doc_start_mask,
    _no_autocast,
    _skip_and_gate,
)
from mamba_train.models.reference.ssd import _SSDCore, ssd_carry

TWO_PI = 2 * math.pi


def rotate_pairs(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (2i, 2i+1) of x (..., n) by theta (..., s), i < s; others unchanged."""
    s = theta.shape[-1]
    head, tail = x[..., : 2 * s], x[..., 2 * s:]
    x0, x1 = head[..., 0::2], head[..., 1::2]
    cos, sin = torch.cos(theta), torch.sin(theta)
    rotated = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2)
    return torch.cat([rotated, tail], dim=-1)


def cumulative_angles(step: torch.Tensor, start: torch.Tensor | None) -> torch.Tensor:
    """Running sum over dim 1 of step (b, l, h, s), restarting where ``start`` (b, l) is True,
    reduced mod 2*pi (the kernel's angle state)."""
    cum = torch.cumsum(step, dim=1)
    if start is not None:
        b, l = start.shape
        pos = torch.arange(l, device=start.device).expand(b, l)
        first = torch.where(start, pos, torch.zeros_like(pos)).cummax(dim=1).values
        before = (cum - step).gather(1, first[:, :, None, None].expand_as(cum))
        cum = cum - before
    return torch.remainder(cum, TWO_PI)


def _prepare(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, seq_idx, cdt, carry=None):
    """Per-head rotated q, k and the (b, l, h) coefficients, in the compute dtype. With a
    ``carry`` (a slice of a longer sequence) the angle entering the slice comes from it."""
    nheads = V.shape[2]
    rep = nheads // Q.shape[2]
    q = Q.to(cdt).repeat_interleave(rep, dim=2) + Q_bias.to(cdt)
    k = K.to(cdt).repeat_interleave(rep, dim=2) + K_bias.to(cdt)
    adt, dt = ADT.to(cdt).transpose(1, 2), DT.to(cdt).transpose(1, 2)
    lam = torch.sigmoid(Trap.to(cdt)).transpose(1, 2)
    start = (_doc_start_mask(seq_idx, V.shape[1]) if carry is None
             else carry.doc_starts(seq_idx, V.shape[1]))
    theta = cumulative_angles(torch.tanh(Angles.to(cdt)) * math.pi * dt[..., None], start)
    if carry is not None:
        # the angle is a running sum: carried like a state whose decay is 1 (0 past a start)
        before_start = torch.ones(theta.shape[:2], dtype=torch.bool, device=theta.device)
        if start is not None:
            before_start = torch.cumsum(start.int(), dim=1) == 0
        theta_in = carry.carry("angle", theta[:, -1], before_start[:, -1, None, None].to(cdt))
        theta = torch.remainder(theta + theta_in[:, None] * before_start[..., None, None], TWO_PI)
    return rotate_pairs(q, theta), rotate_pairs(k, theta), adt, dt, lam, start


def _check(Q, V, Angles):
    if V.shape[2] % Q.shape[2]:
        raise ValueError(f"nheads={V.shape[2]} must be a multiple of the B/C groups {Q.shape[2]}")
    if 2 * Angles.shape[-1] > Q.shape[-1]:
        raise ValueError(f"{Angles.shape[-1]} RoPE angles need d_state >= {2 * Angles.shape[-1]}")


def mamba3_siso_chunked(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D=None, Z=None,
                        chunk_size: int = 64, seq_idx=None, carry=None):
    """Chunked Mamba-3 SISO (module docstring), as the Mamba-2 SSD core plus one correction.

    Unrolling the recurrence, token s reaches t >= s with weight
    ``exp(ADT_{s+1} + ... + ADT_t) * (lam_s DT_s + (1 - lam_{s+1}) DT_{s+1})`` -- except at t = s,
    where the second (next-token) part has not happened yet. So: SSD with decay ADT and inputs
    v_s * scale_s, minus ``(1 - lam_{s+1}) DT_{s+1} (q_s . k_s) v_s`` on the diagonal.
    Returns (batch, seqlen, nheads, headdim) in V.dtype.

    carry: a ``models.state_passing.SequenceCarry`` for a slice of a longer sequence. Three
    things enter from before the slice: the angle (carried), the previous token's rotated k and v
    (a one-token halo: its trapezoid share ``(1 - lam_0) DT_0 alpha_0 k_prev v_prev^T`` is a
    known state entering before token 0), and the SSM state (carried).
    """
    _check(Q, V, Angles)
    cdt = _compute_dtype(V.dtype)
    with _no_autocast(V):
        q, k, adt, dt, lam, start = _prepare(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles,
                                             seq_idx, cdt, carry)
        v = V.to(cdt)
        nxt = F.pad((dt * (1 - lam))[:, 1:], (0, 0, 0, 1))  # the next token's trapezoid share
        log_a = adt
        if start is not None:  # no decay path and no next-token share across a document start
            nxt = nxt.masked_fill(F.pad(start[:, 1:], (0, 1)).unsqueeze(-1), 0.0)
            log_a = adt.masked_fill(start.unsqueeze(-1), -math.inf)
        scale = dt * lam + nxt
        y, final = _SSDCore.apply(v * scale.unsqueeze(-1), log_a, k, q, int(chunk_size))
        y = y - (nxt * (q * k).sum(-1)).unsqueeze(-1) * v
        if carry is not None:
            n = k.shape[-1]
            prev = carry.halo("kv", torch.cat([k[:, -1], v[:, -1]], dim=-1))  # (b, h, n + p)
            share = dt[:, 0] * (1 - lam[:, 0])  # (b, h)
            if start is not None:
                share = share.masked_fill(start[:, :1], 0.0)
            prev_state = share[..., None, None] * prev[..., n:, None] * prev[..., None, :n]
            y = ssd_carry(carry, y, final, q, log_a, extra_state=prev_state)  # (b, h, p, n)
        y = _skip_and_gate(y, v, None if D is None else D[:, None], Z, cdt)
    return y.to(V.dtype)


def mamba3_siso_sequential(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D=None, Z=None,
                           seq_idx=None):
    """The recurrence of the module docstring, one token at a time. Test oracle only."""
    _check(Q, V, Angles)
    cdt = _compute_dtype(V.dtype)
    batch, seqlen, nheads, headdim = V.shape
    rep = nheads // Q.shape[2]
    ys = []
    theta = h = k_prev = v_prev = None
    for t in range(seqlen):
        new_doc = torch.ones(batch, dtype=torch.bool, device=V.device) if t == 0 else (
            torch.zeros(batch, dtype=torch.bool, device=V.device) if seq_idx is None
            else seq_idx[:, t] != seq_idx[:, t - 1])
        keep = (~new_doc).to(cdt)[:, None]  # (b, 1): 0 restarts every state
        dt, adt = DT[:, :, t].to(cdt), ADT[:, :, t].to(cdt)
        lam = torch.sigmoid(Trap[:, :, t].to(cdt))
        step = torch.tanh(Angles[:, t].to(cdt)) * math.pi * dt[..., None]
        theta = step if theta is None else theta * keep[..., None] + step
        theta = theta - TWO_PI * torch.floor(theta / TWO_PI)
        q = rotate_pairs(Q[:, t].to(cdt).repeat_interleave(rep, dim=1) + Q_bias.to(cdt), theta)
        k = rotate_pairs(K[:, t].to(cdt).repeat_interleave(rep, dim=1) + K_bias.to(cdt), theta)
        v = V[:, t].to(cdt)
        alpha = torch.exp(adt)
        cur = (lam * dt)[..., None, None] * v[..., :, None] * k[..., None, :]  # (b, h, p, n)
        if h is None:
            h = cur
        else:
            prev = ((1 - lam) * dt * alpha)[..., None, None] * v_prev[..., :, None] * k_prev[..., None, :]
            h = (alpha[..., None, None] * h + prev) * keep[..., None, None] + cur
        y = torch.einsum("bhpn,bhn->bhp", h, q)
        ys.append(y)
        k_prev, v_prev = k, v
    y = torch.stack(ys, dim=1)
    y = _skip_and_gate(y, V.to(cdt), None if D is None else D[:, None], Z, cdt)
    return y.to(V.dtype)


def cu_seqlens_from_seq_idx(seq_idx: torch.Tensor) -> torch.Tensor:
    """(batch, seqlen) document numbers -> int32 ``cu_seqlens`` of the micro-batch flattened to
    one sequence of batch*seqlen tokens: a boundary at every window start and every document
    start inside a window, and the total length last. (One device->host sync: its length is
    data-dependent.)"""
    batch, seqlen = seq_idx.shape
    start = torch.ones(seq_idx.shape, dtype=torch.bool, device=seq_idx.device)
    start[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    first = torch.nonzero(start.flatten()).flatten()
    return torch.cat([first, first.new_tensor([batch * seqlen])]).to(torch.int32)
