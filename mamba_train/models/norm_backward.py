"""The RMSNorm backward of the fused path as one Triton kernel that keeps several rows in flight.

Why it is written here: mamba_ssm's two norm backward kernels (``layer_norm``: the residual add +
RMSNorm between blocks; ``layernorm_gated``: Mamba-2's ``norm(x * silu(z))`` inside the mixer)
give each SM one program that walks its rows one at a time. A row of the add + norm is ~10 KB of
loads (fp32 residual, its gradient, the bf16 output gradient), about a quarter of what an SM must
have in flight to keep HBM busy, so those kernels run at ~1 TB/s on an H200 (1.5 TB/s for the
gated one; benchmarks/results/2026-12-03-mamba2-norm-kernel.md). Launching them on more programs
gains at most 1.25x (same report). Here each program loads a (BLOCK_M rows x N) tile at once. The
maths is mamba_ssm's, row by row: the same formulas, in fp32, for dx, dz, the residual gradient and
the recomputed output. Only the order of additions changes, in each row's sum and in the norm
weight's gradient (one fp32 partial per program, summed after).

``install()`` points mamba_ssm's call sites (module globals of ``layer_norm``, ``layernorm_gated``
and ``ssd_combined``; private names, tested with mamba_ssm 2.3.x) at the adapters below. Cases the
kernel does not cover (bias, LayerNorm's mean, the gate after the norm, dropout, a second weight,
row scales) go to mamba_ssm's own function, unchanged. ``kernels.norm_backward`` chooses.

On CPU the kernel runs under Triton's interpreter (``TRITON_INTERPRET=1`` before import); that is
how tests/test_norm_backward.py checks it against autograd.
"""

from __future__ import annotations

import contextlib
import functools
import math

import torch

CHOICES = ("mamba_train", "mamba_ssm")  # kernels.norm_backward: this kernel, or mamba_ssm's own
SUPPORTED_MAMBA_SSM = ("2.3.",)
# grid width and tile size: the best of the kernel sweep on an H200 for both norms of
# mamba2-370m (benchmarks/results/2026-12-03-mamba2-norm-kernel.md); rows per tile =
# tile_elements // N
programs_per_sm = 8
tile_elements = 2048
_UPSTREAM: dict[str, object] = {}


@functools.lru_cache(maxsize=None)
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def rmsnorm_bwd_kernel(X, Z, DY, DRES, W, RSTD, DX, DZ, DRES_IN, Y, DW,
                           stride_x, stride_z, stride_dy, stride_dres, stride_dx, stride_dz,
                           stride_dres_in, stride_y, M, N, n_total, rows_per_program,
                           HAS_Z: tl.constexpr, HAS_DRES: tl.constexpr, STORE_DRES_IN: tl.constexpr,
                           RECOMPUTE_Y: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        # program (pid, group): rows [pid * rows_per_program, +rows_per_program) of one group's
        # N columns; y = w * g * rstd with g = x * silu(z) (gated) or x
        pid = tl.program_id(0)
        group = tl.program_id(1)
        cols = tl.arange(0, BLOCK_N)
        cmask = cols < N
        gcols = group * N + cols
        w = tl.load(W + gcols, mask=cmask, other=0.0).to(tl.float32)
        dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
        row_start = pid * rows_per_program
        row_end = tl.minimum(row_start + rows_per_program, M)
        for start in range(row_start, row_end, BLOCK_M):
            rows = start + tl.arange(0, BLOCK_M)
            rmask = rows < row_end
            mask = rmask[:, None] & cmask[None, :]
            r = rows[:, None].to(tl.int64)
            c = gcols[None, :]
            x = tl.load(X + r * stride_x + c, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + r * stride_dy + c, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + group * M + rows, mask=rmask, other=0.0)
            if HAS_Z:
                z = tl.load(Z + r * stride_z + c, mask=mask, other=0.0).to(tl.float32)
                sig = tl.sigmoid(z)
                xhat = x * z * sig * rstd[:, None]
            else:
                xhat = x * rstd[:, None]
            if RECOMPUTE_Y:
                tl.store(Y + r * stride_y + c, xhat * w[None, :], mask=mask)
            wdy = w[None, :] * dy
            c1 = tl.sum(xhat * wdy, axis=1) / N
            dg = (wdy - xhat * c1[:, None]) * rstd[:, None]
            dw += tl.sum(dy * xhat, axis=0)
            if HAS_DRES:
                dg += tl.load(DRES + r * stride_dres + c, mask=mask, other=0.0).to(tl.float32)
            if STORE_DRES_IN:
                tl.store(DRES_IN + r * stride_dres_in + c, dg, mask=mask)
            if HAS_Z:
                tl.store(DZ + r * stride_dz + c, dg * x * sig * (1 + z * (1 - sig)), mask=mask)
                dg = dg * z * sig
            tl.store(DX + r * stride_dx + c, dg, mask=mask)
        tl.store(DW + pid * n_total + gcols, dw, mask=cmask)

    return rmsnorm_bwd_kernel


def row_blocks(sms: int, rows: int, groups: int = 1, block_m: int = 1) -> tuple[int, int]:
    """(programs per group, rows per program) for a grid of about programs_per_sm x SMs: every
    row in exactly one program, no program empty, rows per program a multiple of block_m."""
    tiles = math.ceil(rows / block_m)
    blocks = max(1, min(tiles, math.ceil(sms * programs_per_sm / groups)))
    rows_per_block = math.ceil(tiles / blocks) * block_m
    return math.ceil(rows / rows_per_block), rows_per_block


def rmsnorm_bwd(dy, x, weight, rstd, z=None, dresidual=None, group_size=None, dx_dtype=None,
                store_dresidual=False, recompute_output=False, dz=None, out=None, sms=None):
    """Gradients of ``y = weight * g / rms(g)`` per group of ``group_size`` columns, with
    ``g = x * silu(z)`` when ``z`` is given, else ``g = x`` (plus ``dresidual``, the gradient that
    reaches x around the norm). ``rstd``: (groups * M,) fp32 from the forward. Returns
    ``(dx, dw, dz, dresidual_in, y)``: dresidual_in (fp32 dx) if ``store_dresidual``, y if
    ``recompute_output`` (written into ``out`` when given), else None; dz written into ``dz`` when
    given. Every tensor may have any row stride, as long as its rows are contiguous."""
    import triton

    M, n_total = x.shape
    N = group_size or n_total
    groups = n_total // N
    block_n = triton.next_power_of_2(N)
    block_m = max(1, min(16, tile_elements // block_n))
    dx = torch.empty(M, n_total, dtype=dx_dtype or x.dtype, device=x.device)
    if z is not None and dz is None:
        dz = torch.empty_like(z)
    dres_in = torch.empty(M, n_total, dtype=torch.float32, device=x.device) if store_dresidual else None
    y = None
    if recompute_output:
        y = out if out is not None else torch.empty(M, n_total, dtype=dy.dtype, device=x.device)
    if sms is None:
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 4
    blocks, rows_per_block = row_blocks(sms, M, groups, block_m)
    dw = torch.empty(blocks, n_total, dtype=torch.float32, device=x.device)
    stride = lambda t: t.stride(0) if t is not None else 0  # noqa: E731
    with torch.cuda.device(x.device.index) if x.is_cuda else contextlib.nullcontext():
        _kernel()[(blocks, groups)](
            x, z, dy, dresidual, weight, rstd, dx, dz, dres_in, y, dw,
            x.stride(0), stride(z), dy.stride(0), stride(dresidual), dx.stride(0), stride(dz),
            stride(dres_in), stride(y), M, N, n_total, rows_per_block,
            HAS_Z=z is not None, HAS_DRES=dresidual is not None, STORE_DRES_IN=store_dresidual,
            RECOMPUTE_Y=recompute_output, BLOCK_M=block_m, BLOCK_N=block_n,
            num_warps=8 if block_m * block_n >= 4096 else 4)
    return dx, dw.sum(0).to(weight.dtype), dz, dres_in, y


def _unit_rows(*tensors) -> bool:
    return all(t is None or t.stride(-1) == 1 for t in tensors)


def gated_norm_bwd(dy, x, weight, bias, eps, mean, rstd, z=None, group_size=None,
                   norm_before_gate=True, is_rms_norm=False, recompute_output=False, dz=None,
                   out=None):
    """Drop-in for ``layernorm_gated._layer_norm_bwd`` (same arguments, same returns)."""
    if (bias is not None or not is_rms_norm or (z is not None and norm_before_gate)
            or not _unit_rows(dy, x, z, dz, out)):
        return _UPSTREAM["gated"](dy, x, weight, bias, eps, mean, rstd, z, group_size,
                                  norm_before_gate, is_rms_norm, recompute_output, dz, out)
    dx, dw, dz, _, y = rmsnorm_bwd(dy, x, weight, rstd, z=z, group_size=group_size,
                                   recompute_output=recompute_output, dz=dz, out=out)
    return (dx, dw, None, dz, y) if recompute_output else (dx, dw, None, dz)


def add_norm_bwd(dy, x, weight, bias, eps, mean, rstd, dresidual=None, dy1=None, weight1=None,
                 bias1=None, seeds=None, dropout_p=0.0, rowscale=None, has_residual=False,
                 has_x1=False, is_rms_norm=False, x_dtype=None, recompute_output=False):
    """Drop-in for ``layer_norm._layer_norm_bwd`` (same arguments, same returns)."""
    if (bias is not None or not is_rms_norm or dy1 is not None or weight1 is not None
            or dropout_p > 0.0 or rowscale is not None or has_x1 or recompute_output
            or not _unit_rows(dy, x, dresidual)):
        return _UPSTREAM["add_norm"](dy, x, weight, bias, eps, mean, rstd, dresidual, dy1, weight1,
                                     bias1, seeds, dropout_p, rowscale, has_residual, has_x1,
                                     is_rms_norm, x_dtype, recompute_output)
    dx_dtype = x_dtype or x.dtype
    # the residual stream's gradient is a tensor of its own only where its dtype differs from dx's
    separate = has_residual and dx_dtype != x.dtype
    dx, dw, _, dres_in, _ = rmsnorm_bwd(dy, x, weight, rstd, dresidual=dresidual, dx_dtype=dx_dtype,
                                        store_dresidual=separate)
    if has_residual and not separate:
        dres_in = dx
    return dx, dw, None, dres_in, None, None, None


def install() -> bool:
    """Point mamba_ssm's norm-backward call sites here; False (nothing changed) for a mamba_ssm
    this was not tested with. Idempotent."""
    import mamba_ssm
    from mamba_ssm.ops.triton import layer_norm, layernorm_gated, ssd_combined

    if not mamba_ssm.__version__.startswith(SUPPORTED_MAMBA_SSM):
        return False
    _UPSTREAM.setdefault("gated", layernorm_gated._layer_norm_bwd)
    _UPSTREAM.setdefault("add_norm", layer_norm._layer_norm_bwd)
    layernorm_gated._layer_norm_bwd = ssd_combined._layer_norm_bwd = gated_norm_bwd
    layer_norm._layer_norm_bwd = add_norm_bwd
    return True


def uninstall() -> None:
    """mamba_ssm's own backward again (the plain-loop arms of the benchmarks run on it)."""
    from mamba_ssm.ops.triton import layer_norm, layernorm_gated, ssd_combined

    if _UPSTREAM:
        layernorm_gated._layer_norm_bwd = ssd_combined._layer_norm_bwd = _UPSTREAM["gated"]
        layer_norm._layer_norm_bwd = _UPSTREAM["add_norm"]


def installed() -> bool:
    from mamba_ssm.ops.triton import layer_norm
    return layer_norm._layer_norm_bwd is add_norm_bwd
