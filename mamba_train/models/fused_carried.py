"""The fused mixers on one slice of a longer sequence (context parallelism): mamba_ssm's and
causal-conv1d's kernels run each slice from a zero state, and the carry
(``models/state_passing.py``) joins the slices exactly, as on the reference backend.

Per mixer, what the kernels do and what is added in PyTorch (``models/carried_terms.py``):

* conv (all three with a short conv): causal-conv1d on the previous slice's last ``d_conv - 1``
  inputs followed by the slice (``carried_causal_conv1d``), document numbers extended likewise;
* Mamba-1: ``selective_scan_fn`` from zero; its final state has no gradient upstream, so the
  slice's (final state, decay) and the incoming state's output are computed in PyTorch;
* Mamba-2: ``mamba_chunk_scan_combined(..., return_final_states=True)`` gives the final state
  (with its gradient); the incoming state's output is the reference's ``ssd_state_output``;
* Mamba-3 (SISO): the angle is carried first (a sum over the slice, in PyTorch), then
  ``mamba3_siso`` runs with ``Input_States`` = (incoming angle, zero SSM state, the previous
  token's rotated k and its v) and returns the final SSM state, which the carry scans; the
  incoming SSM state's output is added in PyTorch.

These paths replace mamba_ssm's fused in_proj-to-out_proj functions (``mamba_inner_fn``,
``mamba_split_conv1d_scan_combined``), which take no conv state; the parameters and maths are
the same. Imported only by ``models/fused.py`` (GPU).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from causal_conv1d import causal_conv1d_fn
from einops import rearrange
from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

from mamba_train.models.carried_terms import (mamba3_final_angle, mamba3_incoming_output,
                                              selective_scan_incoming_output,
                                              selective_scan_summary)
from mamba_train.models.reference.common import _compute_dtype, _no_autocast
from mamba_train.models.reference.mamba1 import split_x_proj
from mamba_train.models.reference.mamba2 import split_in_proj
from mamba_train.models.reference.mamba3_ops import (TWO_PI, cu_seqlens_from_seq_idx,
                                                     rotate_pairs)
from mamba_train.models.reference.ssd import _prepare_dt, ssd_carry
from mamba_train.models.state_passing import SequenceCarry, carried_causal_conv1d


def kernel_conv(x, weight, bias, seq_idx=None, activation=None):
    """causal-conv1d's kernel called as the reference ``causal_conv1d``: x (b, d, l); weight
    (d, 1, w) or (d, w)."""
    if weight.dim() == 3:
        weight = weight.squeeze(1)
    if seq_idx is not None:
        seq_idx = seq_idx.to(torch.int32).contiguous()
    elif x.stride(1) == 1 and x.shape[1] % 8:
        x = x.contiguous()  # channel-last needs channels in multiples of 8; channel-first not
    return causal_conv1d_fn(x, weight, bias, seq_idx=seq_idx, activation=activation)


# ----------------------------------------------------------------------------------- Mamba-1
def mamba1_forward(m, hidden_states: torch.Tensor, carry: SequenceCarry) -> torch.Tensor:
    """mamba_ssm's ``Mamba`` (no documents: the fused Mamba-1 scan has no seq_idx) on a slice."""
    x, z = m.in_proj(hidden_states).chunk(2, dim=-1)  # (b, l, d) each
    x = carried_causal_conv1d(x.transpose(1, 2), m.conv1d.weight, m.conv1d.bias, None,
                              m.activation, carry, conv=kernel_conv)  # (b, d, l)
    dt, B, C = split_x_proj(m, m.x_proj(x.transpose(1, 2)))  # Jamba's dt/B/C norms too
    dt = F.linear(dt, m.dt_proj.weight).transpose(1, 2)  # (b, d, l); its bias goes in the scan
    B, C, z = B.transpose(1, 2), C.transpose(1, 2), z.transpose(1, 2)
    A = -torch.exp(m.A_log.float())
    delta_bias = m.dt_proj.bias.float()
    y = selective_scan_fn(x, dt, A, B, C, m.D.float(), z=z, delta_bias=delta_bias,
                          delta_softplus=True)  # (b, d, l), skip and gate applied
    cdt = _compute_dtype(x.dtype)  # fp32 (fp64 for fp64 models)
    with _no_autocast(y):
        delta = F.softplus(dt.to(cdt) + delta_bias[:, None])  # what the kernel scans with
        final, decay = selective_scan_summary(x, delta, A, B)
        h_in = carry.carry("ssm", final, decay)
        y_in = selective_scan_incoming_output(C, delta, A, h_in) * F.silu(z.to(cdt))
    y = (y + y_in).to(y.dtype)
    return m.out_proj(y.transpose(1, 2))


# ----------------------------------------------------------------------------------- Mamba-2
def mamba2_forward(m, hidden_states: torch.Tensor, seq_idx: torch.Tensor | None,
                   carry: SequenceCarry) -> torch.Tensor:
    """mamba_ssm's ``Mamba2`` split path (its ``use_mem_eff_path=False`` forward) on a slice."""
    batch, seqlen, _ = hidden_states.shape
    zxbcdt = m.in_proj(hidden_states)
    A = -torch.exp(m.A_log.float())
    ng_ds = m.ngroups * m.d_state
    z0, x0, z, xBC, dt = split_in_proj(m, zxbcdt)
    xBC = carried_causal_conv1d(xBC.transpose(1, 2), m.conv1d.weight, m.conv1d.bias, seq_idx,
                                m.activation, carry, conv=kernel_conv).transpose(1, 2)
    x, B, C = torch.split(xBC, [m.d_ssm, ng_ds, ng_ds], dim=-1)
    B = rearrange(B, "b l (g n) -> b l g n", g=m.ngroups)
    C = rearrange(C, "b l (g n) -> b l g n", g=m.ngroups)
    y, final = mamba_chunk_scan_combined(
        rearrange(x, "b l (h p) -> b l h p", p=m.headdim), dt, A, B, C,
        chunk_size=m.chunk_size,
        D=rearrange(m.D, "(h p) -> h p", p=m.headdim) if m.D_has_hdim else m.D,
        z=None, dt_bias=m.dt_bias, dt_softplus=True, seq_idx=seq_idx, dt_limit=m.dt_limit,
        return_final_states=True)
    cdt = _compute_dtype(x.dtype)
    with _no_autocast(y):
        log_a = _prepare_dt(dt, m.dt_bias, True, m.dt_limit, cdt) * A
        start = carry.doc_starts(seq_idx, seqlen)
        if start is not None:  # nothing passes a document start, the slice's first token's too
            log_a = log_a.masked_fill(start.unsqueeze(-1), -math.inf)
        y = ssd_carry(carry, y, final.to(cdt), C.to(cdt), log_a).to(y.dtype)
    y = rearrange(y, "b l h p -> b l (h p)")
    y = m.norm(y, z) if m.rmsnorm else y * F.silu(z)
    if z0.shape[-1] > 0:
        y = torch.cat([F.silu(z0) * x0, y], dim=-1)
    return m.out_proj(y)


# ----------------------------------------------------------------------------------- Mamba-3
def _segments(seq_idx: torch.Tensor):
    """cu_seqlens of the flattened micro-batch, and the indices of each row's first and last
    segment in it (a segment per window and per document start inside one)."""
    batch, seqlen = seq_idx.shape
    start = torch.ones(seq_idx.shape, dtype=torch.bool, device=seq_idx.device)
    start[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    segment = torch.cumsum(start.flatten().int(), 0) - 1
    rows = torch.arange(batch, device=seq_idx.device) * seqlen
    return cu_seqlens_from_seq_idx(seq_idx), segment[rows].long(), segment[rows + seqlen - 1].long()


def mamba3_scan(m, inputs: dict, seq_idx: torch.Tensor | None, carry: SequenceCarry,
                siso) -> torch.Tensor:
    """``FusedMamba3.scan`` on a slice; ``siso``: ``fused.mamba3_siso_scan`` (mamba_ssm's SISO
    kernels with input states, returning the output and the final SSM state)."""
    Q, K, V = inputs["Q"].squeeze(2), inputs["K"].squeeze(2), inputs["V"]
    DT, ADT, Angles = inputs["DT"], inputs["ADT"], inputs["Angles"]
    Z = None if m.is_outproj_norm else inputs["Z"]
    Q_bias, K_bias = m.C_bias.squeeze(1), m.B_bias.squeeze(1)
    batch, seqlen, nheads, _ = V.shape
    angles = Angles[:, :, 0]  # (b, l, s): every head rotates by the same projected angles
    f32 = _compute_dtype(V.dtype)  # fp32 (fp64 for fp64 models)
    with _no_autocast(V):
        start = carry.doc_starts(seq_idx, seqlen)
        whole = (torch.ones(batch, dtype=torch.bool, device=V.device) if start is None
                 else ~start.any(dim=1))  # no document starts in the slice
        first = whole if start is None else ~start[:, 0]  # token 0 continues the one before
        own = mamba3_final_angle(angles, DT, start)  # (b, h, s)
        theta_in = carry.carry("angle", own, whole[:, None, None].to(f32))
        theta_in = theta_in * first[:, None, None]
        # the last token's k (rotated by its angle from the sequence start) and v: their
        # trapezoid share enters the next slice
        theta_last = torch.remainder(own + theta_in * whole[:, None, None], TWO_PI)
        k_last = rotate_pairs(K[:, -1].to(f32).repeat_interleave(nheads // K.shape[2], dim=1)
                              + K_bias.to(f32), theta_last)
        prev = carry.halo("kv", torch.cat([k_last, V[:, -1].to(f32)], dim=-1))
        prev = prev * first[:, None, None]
        n = k_last.shape[-1]
        states = [theta_in, V.new_zeros(batch, nheads, V.shape[-1], n, dtype=f32),
                  prev[..., :n], prev[..., n:]]
    args = dict(Q=Q, K=K, V=V, ADT=ADT, DT=DT, Trap=inputs["Trap"], Angles=Angles, Z=Z)
    if seq_idx is None:
        cu_seqlens, last = None, None
    else:  # one varlen sequence; only each row's first segment has a state entering
        cu_seqlens, row_first, last = _segments(seq_idx)
        n_seg = cu_seqlens.shape[0] - 1
        states = [s.new_zeros(n_seg, *s.shape[1:]).index_copy(0, row_first, s) for s in states]
        args = {k: (None if v is None else
                    rearrange(v, "b h l -> 1 h (b l)") if k in ("ADT", "DT", "Trap")
                    else rearrange(v, "b l ... -> 1 (b l) ...")) for k, v in args.items()}

    y, final = siso(**args, Q_bias=Q_bias, K_bias=K_bias, D=m.D, chunk_size=m.chunk_size,
                    cu_seqlens=cu_seqlens, input_states=states)
    if seq_idx is not None:
        y = rearrange(y, "1 (b l) h p -> b l h p", b=batch)
        final = final[last]
    with _no_autocast(V):
        log_a = ADT.to(f32).transpose(1, 2)  # (b, l, h)
        if start is not None:
            log_a = log_a.masked_fill(start.unsqueeze(-1), -math.inf)
        h_in = carry.carry("ssm", final, torch.exp(log_a.sum(1)))
        y_in = mamba3_incoming_output(Q, Q_bias, angles, DT, log_a, theta_in, h_in)
        if Z is not None:
            y_in = y_in * F.silu(Z.to(f32))
    return (y + y_in).to(y.dtype)
