"""Runs models/ssd_bwd_kernel.py's and models/ssd_bwd_fused.py's Triton kernels on CPU under
Triton's interpreter and prints, as JSON, their largest relative differences from a float64
PyTorch form of the same gradients. ``TRITON_INTERPRET`` must be set before triton is imported,
hence a process of its own (tests/test_ssd_bwd_kernel.py). fp32 inputs: the interpreter computes
tl.dot on bf16 operands wrongly."""

import json
import os

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

from mamba_train.models import ssd_bwd_fused, ssd_bwd_kernel  # noqa: E402


def reference(x, dt, dA_cumsum, dout, CB, seq_idx):
    """dCB_ij = Σ_heads dy_i·x_j Δ_j e^(Λ_i−Λ_j) on j ≤ i (same document); ddA_k = Σ_{i≥k>j} of
    those terms times CB_ij, per head; float64, chunk by chunk."""
    b, l, h, _ = x.shape
    _, _, nchunks, cs = dt.shape
    g = CB.shape[2]
    pad = nchunks * cs - l
    xx, dd = (torch.nn.functional.pad(t.double(), (0, 0, 0, 0, 0, pad)) for t in (x, dout))
    xx, dd = (t.view(b, nchunks, cs, h, -1) for t in (xx, dd))
    G = torch.einsum("bcihp,bcjhp->bhcij", dd, xx)
    decay = (dA_cumsum.double()[..., :, None] - dA_cumsum.double()[..., None, :]).clamp(max=0).exp()
    T = G * dt.double()[..., None, :] * decay
    lower = torch.ones(cs, cs).tril().bool()
    T = T.masked_fill(~lower, 0)
    dcb = T.view(b, g, h // g, nchunks, cs, cs).sum(2).transpose(1, 2)  # (b, c, g, i, j)
    if seq_idx is not None:
        si = torch.nn.functional.pad(seq_idx, (0, pad), value=-1).view(b, nchunks, cs)
        dcb = dcb * (si[..., :, None] == si[..., None, :])[:, :, None]
    cb_h = CB.double().repeat_interleave(h // g, dim=2).transpose(1, 2)  # (b, h, c, i, j)
    S = (T * cb_h).masked_fill(~torch.ones(cs, cs).tril(-1).bool(), 0)
    P = S.cumsum(-1)  # P[i, k-1] = Σ_{j<k} S_ij
    dda = torch.zeros(b, h, nchunks, cs, dtype=torch.float64)
    for k in range(1, cs):
        dda[..., k] = P[..., k:, k - 1].sum(-1)
    return dcb, dda


def reference_dx(x, dt, dA_cumsum, B, CB, dout, dstates, D, seq_idx):
    """dx_j = Δ_j (Σ_{i≥j} CB_ij e^(Λ_i−Λ_j) dy_i + e^(Λ_last−Λ_j) B_j·dstates) + D dy_j, the
    bracket times x_j summed over headdim (dΔ), Σ dy·x (dD); float64."""
    b, l, h, p = x.shape
    _, _, nchunks, cs = dt.shape
    g = B.shape[2]
    pad = nchunks * cs - l
    xx, dd, BB = (torch.nn.functional.pad(t.double(), (0, 0, 0, 0, 0, pad)).view(b, nchunks, cs, t.shape[2], -1)
                  for t in (x, dout, B))
    BB = BB.repeat_interleave(h // g, dim=3)  # (b, c, l, h, n)
    lam = dA_cumsum.double()  # (b, h, c, l)
    e = (lam[..., :, None] - lam[..., None, :]).clamp(max=0).exp() * torch.ones(cs, cs).tril()
    M = CB.double().repeat_interleave(h // g, dim=2).transpose(1, 2) * e  # (b, h, c, i, j)
    intra = torch.einsum("bhcij,bcihp->bcjhp", M, dd)
    scale = (lam[..., -1:] - lam).clamp(max=0).exp()  # (b, h, c, l)
    if seq_idx is not None:
        si = torch.nn.functional.pad(seq_idx, (0, pad), value=-1).view(b, nchunks, cs)
        last = torch.stack([si[:, c, min(cs, l - c * cs) - 1] for c in range(nchunks)], 1)
        scale = scale * (si == last[..., None])[:, None]
    inter = torch.einsum("bclhn,bchpn->bclhp", BB, dstates.double()) * scale.permute(0, 2, 3, 1)[..., None]
    acc = intra + inter
    Dx = D.double().view(h, -1)
    dx = acc * dt.double().permute(0, 2, 3, 1)[..., None] + Dx * dd
    ddt = (acc * xx).sum(-1).permute(0, 3, 1, 2)  # (b, h, c, l)
    dD = (dd * xx).sum((0, 1, 2))
    dD = dD if D.dim() == 2 else dD.sum(-1)
    return dx.reshape(b, nchunks * cs, h, p)[:, :l], ddt, dD


def fused_case(seq, sms, D_hdim, block_n=16, b=2, length=80, h=4, groups=2, p=16, n=16, cs=32):
    gen = torch.Generator().manual_seed(0)
    nchunks = -(-length // cs)
    x, dout = torch.randn(b, length, h, p, generator=gen), torch.randn(b, length, h, p, generator=gen)
    B = torch.randn(b, length, groups, n, generator=gen)
    dstates = torch.randn(b, nchunks, h, p, n, generator=gen)
    dt = torch.rand(b, h, nchunks, cs, generator=gen) * 0.5
    dA_cumsum = (-dt * (torch.rand(h, generator=gen) + 0.5)[:, None, None]).cumsum(-1)
    CB = torch.randn(b, nchunks, groups, cs, cs, generator=gen)
    D = torch.randn(h, p, generator=gen) if D_hdim else torch.randn(h, generator=gen)
    seq_idx = (torch.arange(length) >= 45).int().expand(b, length).contiguous() if seq else None
    ssd_bwd_fused.block_n = block_n
    dx, ddt, dD, dcb, dda = ssd_bwd_fused.chunk_scan_bwd_fused(
        x, dt, dA_cumsum, B, CB, dout, dstates, D=D, seq_idx=seq_idx, sms=sms)
    ref_dcb, ref_dda = reference(x, dt, dA_cumsum, dout, CB, seq_idx)
    ref_dx, ref_ddt, ref_dD = reference_dx(x, dt, dA_cumsum, B, CB, dout, dstates, D, seq_idx)
    rel = lambda a, r: ((a.double() - r).abs().max() / r.abs().max()).item()  # noqa: E731
    return {"dx": rel(dx, ref_dx), "ddt": rel(ddt, ref_ddt), "dD": rel(dD, ref_dD),
            "dcb": rel(dcb, ref_dcb), "dda": rel(dda, ref_dda),
            "shapes": [list(t.shape) for t in (dx, ddt, dD, dcb, dda)]}


def case(seq, sms, block_m=16, b=2, length=80, h=4, groups=2, p=16, cs=32):
    gen = torch.Generator().manual_seed(0)
    nchunks = -(-length // cs)
    x = torch.randn(b, length, h, p, generator=gen)
    dout = torch.randn(b, length, h, p, generator=gen)
    dt = torch.rand(b, h, nchunks, cs, generator=gen) * 0.5
    dA_cumsum = (-dt * (torch.rand(h, generator=gen) + 0.5)[:, None, None]).cumsum(-1)
    CB = torch.randn(b, nchunks, groups, cs, cs, generator=gen)
    seq_idx = None
    if seq:
        seq_idx = (torch.arange(length) >= 45).int().expand(b, length).contiguous()
        si = torch.nn.functional.pad(seq_idx, (0, nchunks * cs - length), value=-1)
        same = si.view(b, nchunks, cs)[..., :, None] == si.view(b, nchunks, cs)[..., None, :]
        CB = CB * same[:, :, None]  # mamba_ssm's CB is zero across documents
    ssd_bwd_kernel.block_m = block_m
    dcb, dda = ssd_bwd_kernel.chunk_scan_bwd_dcb_ddA(x, dt, dA_cumsum, dout, CB, seq_idx=seq_idx,
                                                     sms=sms)
    ref_dcb, ref_dda = reference(x, dt, dA_cumsum, dout, CB, seq_idx)
    rel = lambda a, r: ((a.double() - r).abs().max() / r.abs().max()).item()  # noqa: E731
    return {"dcb": rel(dcb, ref_dcb), "dda": rel(dda, ref_dda),
            "shapes": [list(dcb.shape), list(dda.shape)]}


if __name__ == "__main__":
    print(json.dumps({"one_split": case(seq=False, sms=1), "head_splits_seq_idx": case(seq=True, sms=100),
                      "one_row_block": case(seq=False, sms=1, block_m=32),
                      "fused_one_split": fused_case(seq=False, sms=1, D_hdim=False),
                      "fused_splits_seq_idx_D_hdim": fused_case(seq=True, sms=100, D_hdim=True),
                      "fused_one_column_block": fused_case(seq=True, sms=1, D_hdim=False, block_n=32)}))
