"""One Triton kernel for Mamba-2's SSD forward after the chunk cumsum and ``C·Bᵀ``: the chunk
states, the state passing between chunks and the chunk scan of mamba_ssm
(``ssd_chunk_state._chunk_state_fwd``, ``ssd_state_passing._state_passing_fwd``,
``ssd_chunk_scan._chunk_scan_fwd``) in one pass.

Per head, with ``Λ`` the chunk-local cumsum of ``A·Δ`` and ``S`` the state entering a chunk
(headdim x d_state, fp32):

* ``y_i = e^(Λ_i) C_i·S + Σ_{j≤i} CB_ij e^(Λ_i−Λ_j) Δ_j x_j (+ D x_i; · silu(z_i))``,
* ``S ← e^(Λ_last) S + Σ_j e^(Λ_last−Λ_j) Δ_j x_j B_jᵀ`` for the next chunk.

mamba_ssm computes the per-chunk states in one kernel, passes them through the chunks in a second
and reads them back in a third, each state going through global memory three times. Here one
program per (headdim block, head, batch) walks the chunks in order with ``S`` in registers, so the
state passing costs nothing; it stores each entering state once, in fp32, because the backward
(models/ssd.py's ``ssd_backward``) needs exactly those. No atomics and no data-dependent
allocation: deterministic and safe inside a captured CUDA graph.

Document boundaries follow mamba_ssm: ``CB`` is already zero across them; the entering state
reaches the rows of a chunk whose ``seq_idx`` equals that of the previous chunk's last token
(0 before the first chunk), a chunk adds to the state only the tokens of its last token's
document, and the old state decays into the next one only if the chunk's last token is still in
the previous chunk's last document. Roundings follow mamba_ssm too: ``S`` rounded to C's dtype for
``C·S``, the decayed ``CB`` and ``B`` rounded to x's dtype for their products with x, fp32
accumulation everywhere; only the order of fp32 sums differs.

On CPU the kernel runs under Triton's interpreter (tests/test_ssd_fwd_kernel.py).
"""

from __future__ import annotations

import contextlib
import functools

import torch

# chunk rows per block (the same block for the causal column loop). Fixed: it sets the order of
# the fp32 sums, so autotuning picks only among settings that leave the numbers unchanged
# (headdim block, warps, stages); benchmarks/ssd_backward.py --arms fwd --sweep times the others
block_m = 32
# (BLOCK_P, num_warps, num_stages). Registers, not the state alone, are the budget: besides the
# BLOCK_P x d_state fp32 state and this chunk's addition to it, a program holds block_m x d_state
# tiles of C and B (d_state 128). Compiled for sm_90 at d_state 128, bf16, block_m 32, these
# need 190-255 registers a thread and spill nothing, where 4 warps at BLOCK_P 32, or block_m 64
# at 4 or 8 warps, spill. A narrower headdim block gives more programs (batch x heads x
# headdim / BLOCK_P, the chunks being walked in sequence) but reads C, B and CB once per block
CONFIGS = ((32, 8, 1), (64, 8, 1), (16, 8, 1), (32, 8, 2))


@functools.lru_cache(maxsize=None)
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def ssd_fwd_kernel(X, Z, OUT, OUT_X, DT, DA_CS, CB, C, B, D, SEQ_IDX, INIT, STATES, FINAL,
                       seqlen, nchunks, chunk_size, hdim, dstate, heads_per_group,
                       s_x_b, s_x_l, s_x_h, s_x_p, s_z_b, s_z_l, s_z_h, s_z_p,
                       s_o_b, s_o_l, s_o_h, s_o_p, s_dt_b, s_dt_h, s_dt_c, s_dt_l,
                       s_da_b, s_da_h, s_da_c, s_da_l, s_cb_b, s_cb_c, s_cb_g, s_cb_m, s_cb_k,
                       s_c_b, s_c_l, s_c_g, s_c_n, s_b_b, s_b_l, s_b_g, s_b_n, s_d_h,
                       s_si_b, s_si_l, s_i_b, s_i_h, s_i_p, s_i_n,
                       s_s_b, s_s_c, s_s_h, s_s_p, s_s_n, s_f_b, s_f_h, s_f_p, s_f_n,
                       HAS_D: tl.constexpr, D_HAS_HDIM: tl.constexpr, HAS_Z: tl.constexpr,
                       HAS_SEQ_IDX: tl.constexpr, HAS_INIT: tl.constexpr,
                       BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
        pid_p = tl.program_id(0)
        pid_h = tl.program_id(1)
        pid_b = tl.program_id(2)
        pid_g = pid_h // heads_per_group
        offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        offs_n = tl.arange(0, BLOCK_N)
        offs_r = tl.arange(0, BLOCK_M)
        p_ok = offs_p < hdim
        n_ok = offs_n < dstate
        pn_ok = p_ok[:, None] & n_ok[None, :]
        x_dtype = X.dtype.element_ty
        c_dtype = C.dtype.element_ty

        X += pid_b * s_x_b + pid_h * s_x_h
        OUT += pid_b * s_o_b + pid_h * s_o_h
        DT += pid_b * s_dt_b + pid_h * s_dt_h
        DA_CS += pid_b * s_da_b + pid_h * s_da_h
        CB += pid_b * s_cb_b + pid_g * s_cb_g
        C += pid_b * s_c_b + pid_g * s_c_g
        B += pid_b * s_b_b + pid_g * s_b_g
        STATES += pid_b * s_s_b + pid_h * s_s_h
        if HAS_Z:
            Z += pid_b * s_z_b + pid_h * s_z_h
            OUT_X += pid_b * s_o_b + pid_h * s_o_h
        if HAS_SEQ_IDX:
            SEQ_IDX += pid_b * s_si_b
        if HAS_D:
            if D_HAS_HDIM:
                d_skip = tl.load(D + pid_h * s_d_h + offs_p, mask=p_ok, other=0.0).to(tl.float32)
            else:
                d_skip = tl.load(D + pid_h * s_d_h).to(tl.float32)

        if HAS_INIT:
            state = tl.load(INIT + pid_b * s_i_b + pid_h * s_i_h + offs_p[:, None] * s_i_p
                            + offs_n[None, :] * s_i_n, mask=pn_ok, other=0.0).to(tl.float32)
        else:
            state = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
        if HAS_SEQ_IDX:
            seq_prev = tl.full((), 0, SEQ_IDX.dtype.element_ty)  # mamba_ssm's id before token 0
        for c in range(nchunks):
            tok0 = c * chunk_size
            limit = tl.minimum(chunk_size, seqlen - tok0)
            tl.store(STATES + c * s_s_c + offs_p[:, None] * s_s_p + offs_n[None, :] * s_s_n,
                     state, mask=pn_ok)
            dt_c = DT + c * s_dt_c
            da_c = DA_CS + c * s_da_c
            cb_c = CB + c * s_cb_c
            dA_last = tl.load(da_c + (chunk_size - 1) * s_da_l).to(tl.float32)
            if HAS_SEQ_IDX:
                seq_last = tl.load(SEQ_IDX + (tok0 + limit - 1) * s_si_l)
            state_t = tl.trans(state.to(c_dtype))  # (d_state, headdim block) for C·S
            added = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
            for m0 in range(0, limit, BLOCK_M):
                rows = m0 + offs_r
                r_ok = rows < limit
                dA_m = tl.load(da_c + rows * s_da_l, mask=r_ok, other=0.0).to(tl.float32)
                dt_m = tl.load(dt_c + rows * s_dt_l, mask=r_ok, other=0.0).to(tl.float32)
                scale_m = tl.exp(dA_m)
                w_m = tl.exp(tl.minimum(dA_last - dA_m, 0.0)) * dt_m
                if HAS_SEQ_IDX:
                    seq_m = tl.load(SEQ_IDX + (tok0 + rows) * s_si_l, mask=r_ok, other=-1)
                    scale_m = tl.where(seq_m == seq_prev, scale_m, 0.0)
                    w_m = tl.where((seq_last >= 0) & (seq_m == seq_last), w_m, 0.0)
                c_m = tl.load(C + (tok0 + rows[:, None]) * s_c_l + offs_n[None, :] * s_c_n,
                              mask=r_ok[:, None] & n_ok[None, :], other=0.0)
                acc = tl.dot(c_m, state_t) * scale_m[:, None]
                # causal: column blocks up to and including the diagonal one
                for k0 in range(0, m0 + BLOCK_M, BLOCK_M):
                    cols = k0 + offs_r
                    k_ok = cols < limit
                    cb = tl.load(cb_c + rows[:, None] * s_cb_m + cols[None, :] * s_cb_k,
                                 mask=r_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
                    dA_k = tl.load(da_c + cols * s_da_l, mask=k_ok, other=0.0).to(tl.float32)
                    dt_k = tl.load(dt_c + cols * s_dt_l, mask=k_ok, other=0.0).to(tl.float32)
                    cb *= tl.exp(tl.minimum(dA_m[:, None] - dA_k[None, :], 0.0)) * dt_k[None, :]
                    cb = tl.where(rows[:, None] >= cols[None, :], cb, 0.0)
                    x_k = tl.load(X + (tok0 + cols[:, None]) * s_x_l + offs_p[None, :] * s_x_p,
                                  mask=k_ok[:, None] & p_ok[None, :], other=0.0)
                    acc += tl.dot(cb.to(x_dtype), x_k)
                mp_ok = r_ok[:, None] & p_ok[None, :]
                x_m = tl.load(X + (tok0 + rows[:, None]) * s_x_l + offs_p[None, :] * s_x_p,
                              mask=mp_ok, other=0.0)
                if HAS_D:
                    if D_HAS_HDIM:
                        acc += x_m.to(tl.float32) * d_skip[None, :]
                    else:
                        acc += x_m.to(tl.float32) * d_skip
                out_offs = (tok0 + rows[:, None]) * s_o_l + offs_p[None, :] * s_o_p
                if HAS_Z:
                    tl.store(OUT_X + out_offs, acc, mask=mp_ok)
                    z = tl.load(Z + (tok0 + rows[:, None]) * s_z_l + offs_p[None, :] * s_z_p,
                                mask=mp_ok, other=0.0).to(tl.float32)
                    acc *= z * tl.sigmoid(z)
                tl.store(OUT + out_offs, acc, mask=mp_ok)
                # these rows' part of what the chunk adds to the state
                b_m = tl.load(B + (tok0 + rows[:, None]) * s_b_l + offs_n[None, :] * s_b_n,
                              mask=r_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
                b_m = (b_m * w_m[:, None]).to(x_dtype)
                added += tl.dot(tl.trans(x_m), b_m)
            decay = tl.exp(dA_last)
            if HAS_SEQ_IDX:
                decay = tl.where(seq_last == seq_prev, decay, 0.0)
                seq_prev = seq_last
            state = decay * state + added
        tl.store(FINAL + pid_b * s_f_b + pid_h * s_f_h + offs_p[:, None] * s_f_p
                 + offs_n[None, :] * s_f_n, state, mask=pn_ok)

    return ssd_fwd_kernel


@functools.lru_cache(maxsize=None)
def _tuned():
    """The kernel autotuned over CONFIGS per shape (the GPU; the interpreter runs one config)."""
    import triton
    configs = [triton.Config({"BLOCK_P": p}, num_warps=w, num_stages=s) for p, w, s in CONFIGS]
    return triton.autotune(configs, key=["chunk_size", "hdim", "dstate"])(_kernel())


def _strides(t, n):
    return tuple(t.stride()) if t is not None else (0,) * n


def ssd_fwd_fused(x, dt, dA_cumsum, CB, B, C, D=None, z=None, initial_states=None, seq_idx=None,
                  config=None):
    """``(out, out_x, states, final_states)`` as mamba_ssm's chunk_state + state_passing (fp32
    out) + chunk_scan return them: out (batch, seqlen, nheads, headdim) in x's dtype, out_x the
    same before the z gate (None without z), states the fp32 state entering each chunk (batch,
    nchunks, nheads, headdim, d_state), final_states fp32 (batch, nheads, headdim, d_state).
    dt, dA_cumsum (batch, nheads, nchunks, chunk) fp32 from the chunk cumsum; CB (batch, nchunks,
    ngroups, chunk, chunk) zero across documents; B, C (batch, seqlen, ngroups, d_state).
    ``config``: a (BLOCK_P, num_warps, num_stages) (else autotuned over CONFIGS on the GPU, the
    first of them under the interpreter)."""
    import triton

    batch, seqlen, nheads, hdim = x.shape
    _, _, nchunks, chunk_size = dt.shape
    ngroups, dstate = B.shape[2:]
    out = torch.empty(batch, seqlen, nheads, hdim, device=x.device, dtype=x.dtype)
    out_x = torch.empty_like(out) if z is not None else None
    states = torch.empty(batch, nchunks, nheads, hdim, dstate, device=x.device,
                         dtype=torch.float32)
    final = torch.empty(batch, nheads, hdim, dstate, device=x.device, dtype=torch.float32)
    args = (x, z, out, out_x, dt, dA_cumsum, CB, C, B, D, seq_idx, initial_states, states, final,
            seqlen, nchunks, chunk_size, hdim, dstate, nheads // ngroups,
            *x.stride(), *_strides(z, 4), *out.stride(), *dt.stride(), *dA_cumsum.stride(),
            *CB.stride(), *C.stride(), *B.stride(), D.stride(0) if D is not None else 0,
            *_strides(seq_idx, 2), *_strides(initial_states, 4), *states.stride(),
            *final.stride())
    meta = dict(HAS_D=D is not None, D_HAS_HDIM=D is not None and D.dim() == 2,
                HAS_Z=z is not None, HAS_SEQ_IDX=seq_idx is not None,
                HAS_INIT=initial_states is not None,
                BLOCK_N=max(16, triton.next_power_of_2(dstate)),
                BLOCK_M=min(block_m, max(16, triton.next_power_of_2(chunk_size))))
    if config is None and x.is_cuda:
        kernel = _tuned()
        grid = lambda m: (triton.cdiv(hdim, m["BLOCK_P"]), nheads, batch)  # noqa: E731
    else:
        block_p, warps, stages = config or CONFIGS[0]
        kernel = _kernel()
        grid = (triton.cdiv(hdim, block_p), nheads, batch)
        meta.update(BLOCK_P=block_p, num_warps=warps, num_stages=stages)
    with torch.cuda.device(x.device.index) if x.is_cuda else contextlib.nullcontext():
        kernel[grid](*args, **meta)
    return out, out_x, states, final
