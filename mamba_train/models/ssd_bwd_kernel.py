"""One Triton kernel for two intra-chunk gradients of Mamba-2's SSD: d(CB) and the "stable" dA term.

Within a chunk the SSD output is ``y_i = Σ_{j≤i} CB_ij · exp(Λ_i − Λ_j) · Δ_j · x_j`` per head
(``Λ`` the chunk-local cumsum of ``A·Δ``, ``CB`` shared by the heads of a group). With
``G_ij = dy_i · x_j`` (one head) and ``T_ij = G_ij · Δ_j · exp(Λ_i − Λ_j)`` on ``j ≤ i``:

* ``dCB_ij = Σ_heads T_ij`` (zero across document boundaries),
* the gradient w.r.t. each step's ``A·Δ_k`` from the intra-chunk term is
  ``Σ_{i ≥ k > j} T_ij · CB_ij`` (every pair whose decay spans step k): per row i a running sum
  over j, masked to ``j < k ≤ i``, summed over the rows.

mamba_ssm computes these in two kernels (``_chunk_scan_bwd_dcb``: dY·Xᵀ per head, summed over
the heads of a group through a buffer per head split; ``_chunk_scan_bwd_ddAcs_stable``: dY·Xᵀ again
per head, with CB), each reading x, dout and (the second) CB once more. Here one program per
(row block of a chunk, batch x chunk, group x head split) forms ``dY·Xᵀ`` once per head over the whole
chunk width, keeps the group's ``CB`` rows and the ``dCB`` sum on chip across its heads, and writes
both results; no atomics, so deterministic. Same formulas as mamba_ssm, in fp32; only the order of
fp32 additions differs (the row cumsum in one piece, the head sum in one program).

On CPU the kernel runs under Triton's interpreter (``TRITON_INTERPRET=1`` before import); that is
how tests/test_ssd_bwd_kernel.py checks it against a float64 PyTorch form of the formulas above.
"""

from __future__ import annotations

import contextlib
import functools
import math

import torch

# rows of the chunk per program and warps: fixed (no autotuning, so runs repeat bit for bit);
# benchmarks/ssd_backward.py --sweep times the alternatives
block_m = 32
num_warps = 8
# heads per program: enough programs to fill the GPU (as mamba_ssm's dcb kernel splits them)
programs_per_sm = 2
num_stages = 2  # software pipelining of the head loop's loads (shared memory: one copy per stage)


@functools.lru_cache(maxsize=None)
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def dcb_ddA_kernel(X, DOUT, DT, DA_CS, CB, SEQ_IDX, DCB, DDA,
                       chunk_size, hdim, batch, seqlen, heads_per_group, heads_per_program,
                       s_x_b, s_x_l, s_x_h, s_x_p, s_do_b, s_do_l, s_do_h, s_do_p,
                       s_dt_b, s_dt_h, s_dt_c, s_dt_l, s_cb_b, s_cb_c, s_cb_g, s_cb_m, s_cb_n,
                       s_si_b, s_si_l, s_dcb_b, s_dcb_c, s_dcb_s, s_dcb_g, s_dcb_m, s_dcb_n,
                       s_dda_b, s_dda_h, s_dda_c, s_dda_blk, s_dda_l,
                       ngroups, HAS_SEQ_IDX: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_CS: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_bc = tl.program_id(1)
        pid_c = pid_bc // batch
        pid_b = pid_bc - pid_c * batch
        pid_sg = tl.program_id(2)
        pid_s = pid_sg // ngroups
        pid_g = pid_sg - pid_s * ngroups
        head0 = pid_g * heads_per_group + pid_s * heads_per_program
        n_heads = tl.minimum(heads_per_program, heads_per_group - pid_s * heads_per_program)

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_CS)
        offs_k = tl.arange(0, BLOCK_K)
        limit = tl.minimum(chunk_size, seqlen - pid_c * chunk_size)
        # causal: columns past this row block's last row contribute nothing
        limit_n = tl.minimum(limit, (pid_m + 1) * BLOCK_M)
        row = offs_m < limit
        col = offs_n < limit_n
        tok0 = pid_c * chunk_size
        cb = tl.load(CB + pid_b * s_cb_b + pid_c * s_cb_c + pid_g * s_cb_g
                     + offs_m[:, None] * s_cb_m + offs_n[None, :] * s_cb_n,
                     mask=row[:, None] & col[None, :], other=0.0).to(tl.float32)
        lower = offs_m[:, None] >= offs_n[None, :]
        strict = offs_m[:, None] >= offs_n[None, :] + 1
        dcb = tl.zeros((BLOCK_M, BLOCK_CS), dtype=tl.float32)
        for i in range(n_heads):
            h = head0 + i
            dout = tl.load(DOUT + pid_b * s_do_b + h * s_do_h + (tok0 + offs_m[:, None]) * s_do_l
                           + offs_k[None, :] * s_do_p,
                           mask=row[:, None] & (offs_k[None, :] < hdim), other=0.0)
            x = tl.load(X + pid_b * s_x_b + h * s_x_h + (tok0 + offs_n[None, :]) * s_x_l
                        + offs_k[:, None] * s_x_p,
                        mask=col[None, :] & (offs_k[:, None] < hdim), other=0.0)
            g = tl.dot(dout, x)
            base = pid_b * s_dt_b + h * s_dt_h + pid_c * s_dt_c
            dt_n = tl.load(DT + base + offs_n * s_dt_l, mask=col, other=0.0).to(tl.float32)
            dA_m = tl.load(DA_CS + base + offs_m * s_dt_l, mask=row, other=0.0).to(tl.float32)
            dA_n = tl.load(DA_CS + base + offs_n * s_dt_l, mask=col, other=0.0).to(tl.float32)
            t = g * dt_n[None, :] * tl.exp(tl.minimum(dA_m[:, None] - dA_n[None, :], 0.0))
            dcb += t
            # d(A·Δ_k) = Σ_{i ≥ k > j} T_ij CB_ij: running sum along each row, stored one step on
            s = tl.where(strict, t * cb, 0.0)
            s = tl.where(strict, tl.cumsum(s, axis=1), 0.0)
            dda = DDA + pid_b * s_dda_b + h * s_dda_h + pid_c * s_dda_c + pid_m * s_dda_blk
            tl.store(dda + (offs_n + 1) * s_dda_l, tl.sum(s, axis=0),
                     mask=offs_n < chunk_size - 1)
            tl.store(dda, 0.0)
        if HAS_SEQ_IDX:
            si = SEQ_IDX + pid_b * s_si_b + tok0 * s_si_l
            si_m = tl.load(si + offs_m * s_si_l, mask=row, other=-1)
            si_n = tl.load(si + offs_n * s_si_l, mask=offs_n < limit, other=-2)
            dcb = tl.where(si_m[:, None] == si_n[None, :], dcb, 0.0)
        dcb = tl.where(lower, dcb, 0.0)
        tl.store(DCB + pid_b * s_dcb_b + pid_c * s_dcb_c + pid_s * s_dcb_s + pid_g * s_dcb_g
                 + offs_m[:, None] * s_dcb_m + offs_n[None, :] * s_dcb_n, dcb,
                 mask=(offs_m[:, None] < chunk_size) & (offs_n[None, :] < chunk_size))

    return dcb_ddA_kernel


def head_split(x, units: int, heads_per_group: int, sms: int | None,
               per_sm: int) -> tuple[int, int]:
    """Heads per program and programs per group: enough programs for ``per_sm`` of them on every
    SM (``sms``: x's GPU's count when None) over ``units`` (batch x chunks x heads), at most one
    group's heads per program."""
    if sms is None:
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 4
    heads_per_program = max(1, min(heads_per_group, math.ceil(units / (sms * per_sm))))
    return heads_per_program, math.ceil(heads_per_group / heads_per_program)


def chunk_scan_bwd_dcb_ddA(x, dt, dA_cumsum, dout, CB, seq_idx=None, sms=None):
    """``(dCB, ddA)``: dCB (batch, nchunks, ngroups, chunk, chunk) fp32 as mamba_ssm's
    ``_chunk_scan_bwd_dcb`` returns it; ddA (batch, nheads, nchunks, chunk) fp32 as its
    ``_chunk_scan_bwd_ddAcs_stable``. x, dout (batch, seqlen, nheads, headdim); dt, dA_cumsum
    (batch, nheads, nchunks, chunk); CB (batch, nchunks, ngroups, chunk, chunk), already zero
    across document boundaries (seq_idx is used for dCB only, as mamba_ssm does)."""
    import triton

    batch, seqlen, nheads, hdim = x.shape
    _, _, nchunks, chunk_size = dt.shape
    ngroups = CB.shape[2]
    heads_per_group = nheads // ngroups
    heads_per_program, splits = head_split(x, batch * nchunks * nheads, heads_per_group, sms,
                                           programs_per_sm)
    bm = min(block_m, triton.next_power_of_2(chunk_size))
    row_blocks = triton.cdiv(chunk_size, bm)
    dcb = torch.empty(batch, nchunks, splits, ngroups, chunk_size, chunk_size, device=x.device,
                      dtype=torch.float32)
    dda = torch.empty(batch, nheads, nchunks, row_blocks, chunk_size, device=x.device,
                      dtype=torch.float32)
    si = (seq_idx.stride(0), seq_idx.stride(1)) if seq_idx is not None else (0, 0)
    with torch.cuda.device(x.device.index) if x.is_cuda else contextlib.nullcontext():
        _kernel()[(row_blocks, batch * nchunks, splits * ngroups)](
            x, dout, dt, dA_cumsum, CB, seq_idx, dcb, dda,
            chunk_size, hdim, batch, seqlen, heads_per_group, heads_per_program,
            *x.stride(), *dout.stride(), *dt.stride(), *CB.stride(), *si, *dcb.stride(),
            *dda.stride(), ngroups, HAS_SEQ_IDX=seq_idx is not None, BLOCK_M=bm,
            BLOCK_CS=max(16, triton.next_power_of_2(chunk_size)),
            BLOCK_K=max(16, triton.next_power_of_2(hdim)), num_warps=num_warps,
            num_stages=num_stages)
    return (dcb[:, :, 0] if splits == 1 else dcb.sum(2)), dda.sum(3)
