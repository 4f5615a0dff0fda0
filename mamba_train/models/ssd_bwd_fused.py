"""One Triton kernel for the SSD backward's chunk-local gradients: dx, dΔ, dD, d(CB) and the
intra-chunk dA term, replacing three of mamba_ssm's kernels (``_chunk_scan_chunk_state_bwd_dx``,
``_chunk_scan_bwd_dcb``, ``_chunk_scan_bwd_ddAcs_stable``), each of which re-reads x, dout and CB.

Notation as in models/ssd_bwd_kernel.py: per head, ``G_ij = dy_i · x_j``, decay
``e_ij = exp(Λ_i − Λ_j)`` on ``i ≥ j``, ``T_ij = G_ij Δ_j e_ij``. A program owns a block of
*columns* j of one chunk (all rows i) and loops over the heads that share the group's B/C:

* ``dCB_ij = Σ_heads T_ij``: summed on chip across the program's heads,
* ``d(A·Δ_k) = Σ_{j<k} Σ_{i≥k} T_ij CB_ij``: a reverse running sum down each column, so every
  pair (i, j) is handled by the one program owning column j (partials per column block, summed
  after, as mamba_ssm sums its row-block partials),
* ``dx_j = Δ_j (Σ_i CB_ij e_ij dy_i + e^(Λ_last − Λ_j) B_j · dstates) + D dy_j``,
  ``dΔ_j = Σ_p x_j (Σ_i CB_ij e_ij dy_i + e^(Λ_last − Λ_j) B_j · dstates)``, ``dD = Σ dy · x``.

``dy_i · x_j`` is formed once per head and chunk pair block; mamba_ssm forms it twice and reads
CB three times. Same formulas as mamba_ssm (the same roundings of CB·e and dstates to the
activations' dtype before their matmuls), fp32 sums in another order; no atomics.
On CPU it runs under Triton's interpreter: tests/test_ssd_bwd_kernel.py.
"""

from __future__ import annotations

import contextlib
import functools

import torch

from mamba_train.models.ssd_bwd_kernel import head_split

block_n = 32    # columns of the chunk per program
num_warps = 8
programs_per_sm = 2
num_stages = 2  # software pipelining of the head loop's loads (shared memory: one copy per stage)


@functools.lru_cache(maxsize=None)
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def ssd_bwd_fused_kernel(
            X, DOUT, DT, DA_CS, CB, B, DSTATES, D, SEQ_IDX, DX, DDT, DD, DCB, DDA,
            chunk_size, hdim, dstate, batch, seqlen, heads_per_group, heads_per_program, ngroups,
            s_x_b, s_x_l, s_x_h, s_x_p, s_do_b, s_do_l, s_do_h, s_do_p,
            s_dt_b, s_dt_h, s_dt_c, s_dt_l, s_cb_b, s_cb_c, s_cb_g, s_cb_m, s_cb_n,
            s_b_b, s_b_l, s_b_g, s_b_n, s_ds_b, s_ds_c, s_ds_h, s_ds_p, s_ds_n, s_D_h,
            s_si_b, s_si_l, s_dx_b, s_dx_l, s_dx_h, s_dx_p,
            s_dd_blk, s_dd_b, s_dd_c, s_dd_h, s_dd_p,
            s_dcb_b, s_dcb_c, s_dcb_s, s_dcb_g, s_dcb_m, s_dcb_n,
            s_dda_b, s_dda_h, s_dda_c, s_dda_blk, s_dda_l,
            HAS_D: tl.constexpr, D_HAS_HDIM: tl.constexpr, HAS_SEQ_IDX: tl.constexpr,
            BLOCK_N: tl.constexpr, BLOCK_CS: tl.constexpr, BLOCK_K: tl.constexpr,
            BLOCK_DSTATE: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_bc = tl.program_id(1)
        pid_c = pid_bc // batch
        pid_b = pid_bc - pid_c * batch
        pid_sg = tl.program_id(2)
        pid_s = pid_sg // ngroups
        pid_g = pid_sg - pid_s * ngroups
        head0 = pid_g * heads_per_group + pid_s * heads_per_program
        n_heads = tl.minimum(heads_per_program, heads_per_group - pid_s * heads_per_program)

        offs_j = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)   # this program's columns
        offs_i = tl.arange(0, BLOCK_CS)                    # every row of the chunk
        offs_k = tl.arange(0, BLOCK_K)
        offs_s = tl.arange(0, BLOCK_DSTATE)
        limit = tl.minimum(chunk_size, seqlen - pid_c * chunk_size)
        tok0 = pid_c * chunk_size
        col = offs_j < limit
        row = (offs_i < limit) & (offs_i >= pid_n * BLOCK_N)  # rows above the block: zero terms
        kmask = offs_k < hdim
        lower = offs_i[None, :] >= offs_j[:, None]         # (j, i): i ≥ j
        strict = offs_i[None, :] > offs_j[:, None]
        # CB transposed, (j, i); zero across documents already (mamba_ssm's forward)
        cbt = tl.load(CB + pid_b * s_cb_b + pid_c * s_cb_c + pid_g * s_cb_g
                      + offs_i[None, :] * s_cb_m + offs_j[:, None] * s_cb_n,
                      mask=col[:, None] & row[None, :], other=0.0).to(tl.float32)
        b_j = tl.load(B + pid_b * s_b_b + pid_g * s_b_g + (tok0 + offs_j[:, None]) * s_b_l
                      + offs_s[None, :] * s_b_n,
                      mask=col[:, None] & (offs_s[None, :] < dstate), other=0.0)
        if HAS_SEQ_IDX:
            si = SEQ_IDX + pid_b * s_si_b + tok0 * s_si_l
            si_j = tl.load(si + offs_j * s_si_l, mask=col, other=-1)
            si_last = tl.load(si + (limit - 1) * s_si_l)
        dcb = tl.zeros((BLOCK_N, BLOCK_CS), dtype=tl.float32)
        for hh in range(n_heads):
            h = head0 + hh
            dy = tl.load(DOUT + pid_b * s_do_b + h * s_do_h + (tok0 + offs_i[:, None]) * s_do_l
                         + offs_k[None, :] * s_do_p, mask=row[:, None] & kmask[None, :], other=0.0)
            x_j = tl.load(X + pid_b * s_x_b + h * s_x_h + (tok0 + offs_j[:, None]) * s_x_l
                          + offs_k[None, :] * s_x_p, mask=col[:, None] & kmask[None, :], other=0.0)
            base = pid_b * s_dt_b + h * s_dt_h + pid_c * s_dt_c
            dt_j = tl.load(DT + base + offs_j * s_dt_l, mask=col, other=0.0).to(tl.float32)
            dA_j = tl.load(DA_CS + base + offs_j * s_dt_l, mask=col, other=0.0).to(tl.float32)
            dA_i = tl.load(DA_CS + base + offs_i * s_dt_l, mask=offs_i < limit,
                           other=0.0).to(tl.float32)
            dA_last = tl.load(DA_CS + base + (chunk_size - 1) * s_dt_l).to(tl.float32)
            decay = tl.where(lower, tl.exp(tl.minimum(dA_i[None, :] - dA_j[:, None], 0.0)), 0.0)
            # dCB and the dA term from G = (dy xᵀ)ᵀ
            t = tl.dot(x_j, tl.trans(dy)) * dt_j[:, None] * decay
            dcb += t
            s = tl.where(strict, t * cbt, 0.0)
            s = tl.cumsum(s, axis=1, reverse=True)
            dda = DDA + pid_b * s_dda_b + h * s_dda_h + pid_c * s_dda_c + pid_n * s_dda_blk
            tl.store(dda + offs_i * s_dda_l, tl.sum(tl.where(strict, s, 0.0), axis=0),
                     mask=offs_i < chunk_size)
            # dx before Δ: inter-chunk (B_j · dstates, decayed to the chunk end) + intra-chunk
            ds = tl.load(DSTATES + pid_b * s_ds_b + pid_c * s_ds_c + h * s_ds_h
                         + offs_s[:, None] * s_ds_n + offs_k[None, :] * s_ds_p,
                         mask=(offs_s[:, None] < dstate) & kmask[None, :], other=0.0)
            scale = tl.exp(tl.minimum(dA_last - dA_j, 0.0))
            if HAS_SEQ_IDX:
                scale = tl.where(si_j == si_last, scale, 0.0)
            acc = tl.dot(b_j, ds.to(b_j.dtype)) * scale[:, None]
            acc += tl.dot((cbt * decay).to(dy.dtype), dy)
            dx = acc * dt_j[:, None]
            x_f = x_j.to(tl.float32)
            if HAS_D:
                dy_j = tl.load(DOUT + pid_b * s_do_b + h * s_do_h + (tok0 + offs_j[:, None]) * s_do_l
                               + offs_k[None, :] * s_do_p, mask=col[:, None] & kmask[None, :],
                               other=0.0).to(tl.float32)
                dd = DD + pid_n * s_dd_blk + pid_b * s_dd_b + pid_c * s_dd_c + h * s_dd_h
                if D_HAS_HDIM:
                    d_h = tl.load(D + h * s_D_h + offs_k, mask=kmask, other=0.0).to(tl.float32)
                    dx += dy_j * d_h[None, :]
                    tl.store(dd + offs_k * s_dd_p, tl.sum(dy_j * x_f, axis=0), mask=kmask)
                else:
                    dx += dy_j * tl.load(D + h * s_D_h).to(tl.float32)
                    tl.store(dd, tl.sum(dy_j * x_f))
            tl.store(DX + pid_b * s_dx_b + h * s_dx_h + (tok0 + offs_j[:, None]) * s_dx_l
                     + offs_k[None, :] * s_dx_p, dx, mask=col[:, None] & kmask[None, :])
            tl.store(DDT + base + offs_j * s_dt_l, tl.sum(acc * x_f, axis=1),
                     mask=offs_j < chunk_size)
        if HAS_SEQ_IDX:
            si_i = tl.load(si + offs_i * s_si_l, mask=offs_i < limit, other=-2)
            dcb = tl.where(si_j[:, None] == si_i[None, :], dcb, 0.0)
        tl.store(DCB + pid_b * s_dcb_b + pid_c * s_dcb_c + pid_s * s_dcb_s + pid_g * s_dcb_g
                 + offs_i[None, :] * s_dcb_m + offs_j[:, None] * s_dcb_n, tl.where(lower, dcb, 0.0),
                 mask=(offs_j[:, None] < chunk_size) & (offs_i[None, :] < chunk_size))

    return ssd_bwd_fused_kernel


def chunk_scan_bwd_fused(x, dt, dA_cumsum, B, CB, dout, dstates, D=None, seq_idx=None, dx=None,
                         sms=None):
    """``(dx, ddt, dD, dCB, ddA)``: what mamba_ssm's ``_chunk_scan_chunk_state_bwd_dx`` (dx, ddt,
    dD), ``_chunk_scan_bwd_dcb`` (dCB) and ``_chunk_scan_bwd_ddAcs_stable`` (ddA) return, same
    shapes and dtypes; dx written into ``dx`` when given. dstates: (batch, nchunks, nheads,
    headdim, d_state), the gradient of the state entering each chunk."""
    import triton

    batch, seqlen, nheads, hdim = x.shape
    _, _, nchunks, chunk_size = dt.shape
    ngroups, dstate = B.shape[2:]
    # dΔ is written with Δ's strides (all three are (batch, nheads, nchunks, chunk) contiguous)
    assert dt.is_contiguous() and dA_cumsum.is_contiguous() and dout.shape == x.shape
    heads_per_group = nheads // ngroups
    heads_per_program, splits = head_split(x, batch * nchunks * nheads, heads_per_group, sms,
                                           programs_per_sm)
    bn = min(block_n, triton.next_power_of_2(chunk_size))
    col_blocks = triton.cdiv(chunk_size, bn)
    f32 = dict(device=x.device, dtype=torch.float32)
    dx = torch.empty_like(x) if dx is None else dx
    ddt = torch.empty(batch, nheads, nchunks, chunk_size, **f32)
    dD = None
    if D is not None:
        dD = torch.empty(col_blocks, batch, nchunks, nheads, hdim if D.dim() == 2 else 1, **f32)
    dcb = torch.empty(batch, nchunks, splits, ngroups, chunk_size, chunk_size, **f32)
    dda = torch.empty(batch, nheads, nchunks, col_blocks, chunk_size, **f32)
    zeros5 = (0,) * 5
    with torch.cuda.device(x.device.index) if x.is_cuda else contextlib.nullcontext():
        _kernel()[(col_blocks, batch * nchunks, splits * ngroups)](
            x, dout, dt, dA_cumsum, CB, B, dstates, D, seq_idx, dx, ddt, dD, dcb, dda,
            chunk_size, hdim, dstate, batch, seqlen, heads_per_group, heads_per_program, ngroups,
            *x.stride(), *dout.stride(), *dt.stride(), *CB.stride(), *B.stride(),
            *dstates.stride(), D.stride(0) if D is not None else 0,
            *(seq_idx.stride() if seq_idx is not None else (0, 0)), *dx.stride(),
            *(dD.stride() if dD is not None else zeros5), *dcb.stride(), *dda.stride(),
            HAS_D=D is not None, D_HAS_HDIM=D is not None and D.dim() == 2,
            HAS_SEQ_IDX=seq_idx is not None, BLOCK_N=bn,
            BLOCK_CS=max(16, triton.next_power_of_2(chunk_size)),
            BLOCK_K=max(16, triton.next_power_of_2(hdim)),
            BLOCK_DSTATE=max(16, triton.next_power_of_2(dstate)), num_warps=num_warps,
            num_stages=num_stages)
    if dD is not None:
        dD = dD.sum(dim=(0, 1, 2))
        dD = (dD if D.dim() == 2 else dD.sum(-1)).to(D.dtype)
    return (dx, ddt, dD, dcb[:, :, 0] if splits == 1 else dcb.sum(2), dda.sum(3))
