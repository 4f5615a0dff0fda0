"""The RMSNorm kernels of a mamba2-370m layer alone: mamba_ssm's backward vs ``models/norm_backward.py``.

Two norms per layer, at micro-batch 8 x 2048 (M = 16,384 rows):
  gated   Mamba-2's norm(x * silu(z)) over d_inner = 2048 (bf16 x, z; fp32 weight), as the
          mem-efficient mixer calls it: backward with the output recomputed for out_proj;
  addnorm the residual add + RMSNorm between blocks over d_model = 1024 (fp32 residual stream).
Prints per norm the forward and the backward (CUDA events, median of --reps), the bytes each must
move and the bandwidth that is, for mamba_ssm's kernels and for norm_backward's at each
``--programs-per-sm`` x ``--tile-elements``, with the largest difference of every output from
mamba_ssm's.

    python benchmarks/norm_kernels.py --programs-per-sm 2 4 8 --tile-elements 2048 4096 8192
"""

from __future__ import annotations

import argparse
import itertools
import sys

import torch

from ssd_kernels import time_ms


def gated_case(M=16384, N=2048, device="cuda"):
    from mamba_ssm.ops.triton import layernorm_gated as g
    torch.manual_seed(0)
    bf = dict(device=device, dtype=torch.bfloat16)
    x, z, dy = (torch.randn(M, N, **bf) for _ in range(3))
    w = torch.rand(N, device=device) + 0.5
    _, _, rstd = g._layer_norm_fwd(x, w, None, 1e-5, z=z, norm_before_gate=False, is_rms_norm=True)
    fwd = lambda: g._layer_norm_fwd(x, w, None, 1e-5, z=z, norm_before_gate=False, is_rms_norm=True)
    bwd_args = (dy, x, w, None, 1e-5, None, rstd, z)
    bwd_kw = dict(group_size=N, norm_before_gate=False, is_rms_norm=True, recompute_output=True)
    # fwd reads x, z, writes y; bwd reads dy, x, z, writes dx, dz and the recomputed y (bf16 each)
    return fwd, bwd_args, bwd_kw, 3 * M * N * 2, 6 * M * N * 2


def addnorm_case(M=16384, N=1024, device="cuda"):
    from mamba_ssm.ops.triton import layer_norm as ln
    torch.manual_seed(0)
    h = torch.randn(M, N, device=device, dtype=torch.bfloat16)
    res = torch.randn(M, N, device=device)
    dy = torch.randn(M, N, device=device, dtype=torch.bfloat16)
    dres = torch.randn(M, N, device=device)
    w = torch.rand(N, device=device) + 0.5
    out = ln._layer_norm_fwd(h, w, None, 1e-5, residual=res, out_dtype=torch.bfloat16,
                             residual_dtype=torch.float32, is_rms_norm=True)
    mean, rstd, res_out = out[2], out[3], out[4]
    fwd = lambda: ln._layer_norm_fwd(h, w, None, 1e-5, residual=res, out_dtype=torch.bfloat16,
                                     residual_dtype=torch.float32, is_rms_norm=True)
    bwd_args = (dy, res_out, w, None, 1e-5, mean, rstd, dres)
    bwd_kw = dict(has_residual=True, is_rms_norm=True, x_dtype=torch.bfloat16)
    # fwd reads h (bf16) + residual (fp32), writes y (bf16) + residual out (fp32); bwd reads dy
    # (bf16), x (fp32), dresidual (fp32), writes dx (bf16) + dresidual_in (fp32)
    return fwd, bwd_args, bwd_kw, M * N * 12, M * N * 16


def max_diffs(a, b) -> str:
    parts = []
    for i, (u, v) in enumerate(zip(a, b)):
        if isinstance(u, torch.Tensor) and isinstance(v, torch.Tensor):
            d = (u.float() - v.float()).abs().max().item()
            parts.append(f"out{i} {d:.2e}")
    return ", ".join(parts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--programs-per-sm", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--tile-elements", type=int, nargs="+", default=[2048, 4096, 8192])
    ap.add_argument("--mamba-ssm-wider", type=int, nargs="*", default=[], metavar="PPS",
                    help="also time mamba_ssm's own kernels on PPS programs per SM (the dropped "
                         "lever, benchmarks/norm_wider_grid.py), e.g. 1 2 4 8 16")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    from mamba_ssm.ops.triton import layer_norm as ln
    from mamba_ssm.ops.triton import layernorm_gated as g
    from mamba_train.models import norm_backward

    import norm_wider_grid
    cases = {"gated": (gated_case, g._layer_norm_bwd, norm_backward.gated_norm_bwd, norm_wider_grid.gated_bwd),
             "addnorm": (addnorm_case, ln._layer_norm_bwd, norm_backward.add_norm_bwd,
                         norm_wider_grid.add_norm_bwd)}
    norm_backward._UPSTREAM.update(gated=g._layer_norm_bwd, add_norm=ln._layer_norm_bwd)
    for name, (make, upstream, ours, wider) in cases.items():
        fwd, bwd_args, bwd_kw, fwd_bytes, bwd_bytes = make()
        t = time_ms(fwd, args.reps)
        print(f"NORMKERNEL {name} fwd mamba_ssm {t:.3f} ms ({fwd_bytes / t / 1e6:.0f} GB/s)", flush=True)
        ref = upstream(*bwd_args, **bwd_kw)
        t0 = time_ms(lambda: upstream(*bwd_args, **bwd_kw), args.reps)
        print(f"NORMKERNEL {name} bwd mamba_ssm {t0:.3f} ms ({bwd_bytes / t0 / 1e6:.0f} GB/s)", flush=True)
        for pps in args.mamba_ssm_wider:
            got = wider(pps, *bwd_args, **bwd_kw)
            t1 = time_ms(lambda: wider(pps, *bwd_args, **bwd_kw), args.reps)
            print(f"NORMKERNEL {name} bwd mamba_ssm kernel on programs_per_sm={pps} {t1:.3f} ms "
                  f"({bwd_bytes / t1 / 1e6:.0f} GB/s) | mamba_ssm/ours {t0 / t1:.2f}x | "
                  f"max |diff| vs mamba_ssm: {max_diffs(got, ref)}", flush=True)
        for pps, tile in itertools.product(args.programs_per_sm, args.tile_elements):
            norm_backward.programs_per_sm, norm_backward.tile_elements = pps, tile
            got = ours(*bwd_args, **bwd_kw)
            t1 = time_ms(lambda: ours(*bwd_args, **bwd_kw), args.reps)
            print(f"NORMKERNEL {name} bwd norm_backward programs_per_sm={pps} tile={tile} {t1:.3f} ms "
                  f"({bwd_bytes / t1 / 1e6:.0f} GB/s) | mamba_ssm/ours {t0 / t1:.2f}x | "
                  f"max |diff| vs mamba_ssm: {max_diffs(got, ref)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
