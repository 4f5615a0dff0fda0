"""The dropped lever of benchmarks/RESULTS.md (2026-12-03, session 9): mamba_ssm's own RMSNorm
backward kernels, launched on ``programs_per_sm`` x SMs programs instead of one per SM. Kept
only so that ``norm_kernels.py --mamba-ssm-wider`` can reproduce the measurement; training runs
``mamba_train/models/norm_backward.py``. Covers the forms norm_kernels.py times (RMS, no bias)."""

from __future__ import annotations

import math

import torch


def _grid(x, rows, groups, programs_per_sm):
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    blocks = max(1, min(rows, math.ceil(sms * programs_per_sm / groups)))
    per_block = math.ceil(rows / blocks)
    return math.ceil(rows / per_block), per_block


def gated_bwd(programs_per_sm, dy, x, weight, bias, eps, mean, rstd, z=None, group_size=None,
              norm_before_gate=True, is_rms_norm=False, recompute_output=False, dz=None, out=None):
    import triton
    from mamba_ssm.ops.triton import layernorm_gated as g
    M, N = x.shape
    group_size = group_size or N
    block_n = triton.next_power_of_2(group_size)
    dx = torch.empty_like(x)
    dz = dz if dz is not None or z is None else torch.empty_like(z)
    out = out if out is not None or not recompute_output else torch.empty_like(x)
    blocks, per_block = _grid(x, M, N // group_size, programs_per_sm)
    dw = torch.empty((blocks, N), dtype=torch.float32, device=x.device)
    g._layer_norm_bwd_kernel[(blocks, N // group_size)](
        x, weight, None, z, out if recompute_output else None, dy, dx, dw, None, dz, mean, rstd,
        x.stride(0), z.stride(0) if z is not None else 0, out.stride(0) if recompute_output else 0,
        dy.stride(0), dx.stride(0), dz.stride(0) if dz is not None else 0, dw.stride(0), 0,
        M, group_size, eps, per_block, BLOCK_N=block_n, NORM_BEFORE_GATE=norm_before_gate,
        IS_RMS_NORM=is_rms_norm, num_warps=min(max(block_n // 256, 1), 8))
    dw = dw.sum(0).to(weight.dtype)
    return (dx, dw, None, dz, out) if recompute_output else (dx, dw, None, dz)


def add_norm_bwd(programs_per_sm, dy, x, weight, bias, eps, mean, rstd, dresidual=None,
                 has_residual=False, is_rms_norm=False, x_dtype=None):
    import triton
    from mamba_ssm.ops.triton import layer_norm as ln
    M, N = x.shape
    dx = torch.empty(M, N, dtype=x_dtype or x.dtype, device=x.device)
    dres_in = torch.empty_like(x) if has_residual and dx.dtype != x.dtype else None
    blocks, per_block = _grid(x, M, 1, programs_per_sm)
    dw = torch.empty((blocks, N), dtype=torch.float32, device=x.device)
    ln._layer_norm_bwd_kernel[(blocks,)](
        x, weight, None, None, dy, dx, dw, None, dresidual, None, None, None, None, None, dres_in,
        None, None, mean, rstd, x.stride(0), 0, dy.stride(0), dx.stride(0),
        dresidual.stride(0) if dresidual is not None else 0, 0, 0,
        dres_in.stride(0) if dres_in is not None else 0, M, N, eps, 0.0, per_block, is_rms_norm,
        triton.next_power_of_2(N), dresidual is not None, dres_in is not None, False, False)
    dw = dw.sum(0).to(weight.dtype)
    return dx, dw, None, dres_in if dres_in is not None else (dx if has_residual else None), None, None, None
