"""Runs models/ssd_fwd_kernel.py's fused SSD forward on CPU under Triton's interpreter and prints,
as JSON, its largest relative differences from (a) a float64 token-by-token recurrence written
here (outputs, the gate's input, the state entering each chunk, the final state) and (b) the
reference backend's ``ssd_chunked`` (models/reference/ssd.py). The chunk cumsum and ``C·Bᵀ`` the
kernel takes are computed here in PyTorch, as mamba_ssm's kernels define them. fp32 inputs: the
interpreter computes tl.dot on bf16 operands wrongly. Cases are chosen with ``argv[1:]`` (all by
default); ``TRITON_INTERPRET`` must be set before triton is imported, hence a process of its own
(tests/test_ssd_fwd_kernel.py)."""

import json
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from mamba_train.models import ssd_fwd_kernel  # noqa: E402
from mamba_train.models.reference.ssd import _prepare_dt, ssd_chunked  # noqa: E402


def chunked_inputs(dt_raw, A, B, C, cs, seq_idx, dt_bias, dt_softplus, dt_limit):
    """dt and dA_cumsum (batch, heads, chunks, chunk) zero-padded past the end, as mamba_ssm's
    chunk cumsum returns them, and CB (batch, chunks, groups, chunk, chunk), zero across
    documents as its bmm returns it."""
    b, length, h = dt_raw.shape
    nchunks = -(-length // cs)
    pad = nchunks * cs - length
    dt = _prepare_dt(dt_raw, dt_bias, dt_softplus, dt_limit, torch.float32)
    dt = F.pad(dt, (0, 0, 0, pad)).view(b, nchunks, cs, h).permute(0, 3, 1, 2).contiguous()
    dA_cumsum = (dt * A[:, None, None]).cumsum(-1)
    Bc, Cc = (F.pad(t, (0, 0, 0, 0, 0, pad)).view(b, nchunks, cs, *t.shape[2:]) for t in (B, C))
    CB = torch.einsum("bcign,bcjgn->bcgij", Cc, Bc)
    if seq_idx is not None:
        si = F.pad(seq_idx, (0, pad), value=-1).view(b, nchunks, cs)
        CB = CB * (si[..., :, None] == si[..., None, :])[:, :, None]
    return dt, dA_cumsum, CB.contiguous()


def recurrence(x, dt, A, B, C, D, z, h0, seq_idx, cs):
    """Float64, one token at a time: h_t = e^(Δ_t A) h_{t-1} + Δ_t x_t B_tᵀ (reset where seq_idx
    differs from the token before; 0 before token 0), y_t = C_t·h_t + D x_t, times silu(z_t).
    Returns y, y before the gate, the state before each chunk's first token and the last state.
    dt here is per token (batch, seqlen, heads), already softplus'd / clamped."""
    b, length, h, p = x.shape
    rep = h // B.shape[2]
    Bh, Ch = (t.double().repeat_interleave(rep, dim=2) for t in (B, C))
    x, dt = x.double(), dt.double()
    state = (h0.double() if h0 is not None
             else torch.zeros(b, h, p, B.shape[-1], dtype=torch.float64))
    prev = torch.zeros(b, dtype=seq_idx.dtype) if seq_idx is not None else None
    ys, entering = [], []
    for t in range(length):
        if t % cs == 0:
            entering.append(state.clone())
        decay = torch.exp(dt[:, t] * A.double())  # (b, h)
        if seq_idx is not None:
            decay = decay * (seq_idx[:, t] == prev).double()[:, None]
            prev = seq_idx[:, t]
        step = (dt[:, t, :, None] * x[:, t])[..., None] * Bh[:, t, :, None]
        state = decay[..., None, None] * state + step
        ys.append((state * Ch[:, t, :, None]).sum(-1))
    y = torch.stack(ys, 1)
    if D is not None:
        y = y + x * (D.double() if D.dim() == 2 else D.double()[:, None])
    y_gated = y * F.silu(z.double()) if z is not None else y
    return y_gated, y, torch.stack(entering, 1), state


def case(b=2, length=80, h=4, groups=2, p=32, n=16, cs=32, block_p=16, block_m=16, seq=True,
         init=True, gate=True, D_hdim=True, softplus=True, dt_limit=(0.0, float("inf"))):
    gen = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    x, dt_raw, B, C, z = r(b, length, h, p), r(b, length, h), r(b, length, groups, n), \
        r(b, length, groups, n), r(b, length, h, p)
    z = z if gate else None
    A = -torch.rand(h, generator=gen) - 0.5
    dt_bias = r(h) * 0.5
    D = r(h, p) if D_hdim else r(h)
    h0 = r(b, h, p, n) if init else None
    seq_idx = None
    if seq:  # a boundary inside a chunk and one on a chunk's first token
        pos = torch.arange(length)
        seq_idx = ((pos >= 45).int() + (pos >= 64).int()).expand(b, length).contiguous()
    dt, dA_cumsum, CB = chunked_inputs(dt_raw, A, B, C, cs, seq_idx, dt_bias, softplus, dt_limit)
    ssd_fwd_kernel.block_m = block_m
    out, out_x, states, final = ssd_fwd_kernel.ssd_fwd_fused(
        x, dt, dA_cumsum, CB, B, C, D=D, z=z, initial_states=h0, seq_idx=seq_idx,
        config=(block_p, 4, 1))
    dt_tok = _prepare_dt(dt_raw, dt_bias, softplus, dt_limit, torch.float32)
    ref_y, ref_x, ref_states, ref_final = recurrence(x, dt_tok, A, B, C, D, z, h0, seq_idx, cs)
    rel = lambda a, ref: ((a.double() - ref).abs().max() / ref.abs().max()).item()  # noqa: E731
    result = {"out": rel(out, ref_y), "states": rel(states, ref_states),
              "final": rel(final, ref_final),
              "shapes": [list(t.shape) for t in (out, states, final)],
              "dtypes": [str(t.dtype) for t in (out, states, final)]}
    if gate:
        result["out_x"] = rel(out_x, ref_x)
    if not init:  # the reference backend's chunked SSD (it takes no initial state)
        ref = ssd_chunked(x, dt_raw, A, B, C, cs, D=D, dt_bias=dt_bias, dt_softplus=softplus,
                          seq_idx=seq_idx, dt_limit=dt_limit, z=z)
        result["reference_backend"] = rel(out, ref.double())
    return result


CASES = {
    # odd length, 2 groups of 2 heads, 2 headdim blocks, 2 row blocks per chunk, documents,
    # initial state, z gate, D per channel
    "groups_seq_init_gate": dict(),
    # one group, length a multiple of the chunk, one headdim block, one row block per chunk,
    # d_state and headdim no power of 2 (masked), D per head, a dt_limit that clamps
    "plain_masked": dict(b=1, length=64, h=2, groups=1, p=24, n=12, block_p=32, block_m=32,
                         seq=False, init=False, gate=False, D_hdim=False,
                         dt_limit=(0.05, 1.5)),
    # documents without an initial state, against the reference backend too
    "seq_no_init": dict(b=1, length=72, h=2, groups=1, p=16, n=16, block_p=16, init=False),
}

if __name__ == "__main__":
    names = sys.argv[1:] or list(CASES)
    print(json.dumps({name: case(**CASES[name]) for name in names}))
