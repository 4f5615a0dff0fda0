"""The Mamba-2 SSD alone: mamba_ssm's ``mamba_chunk_scan_combined`` vs fla's simple-GLA chunk
kernels through ``mamba_train.models.ssd_fla`` (Δ softplus, D skip included in both), at one
layer of mamba2-370m (micro-batch 8 x 2048, 32 heads of 64, d_state 128, one group).

Prints ``SSDKERNEL <kernel> fwd <ms> | fwd+bwd <ms>`` per kernel (CUDA events, median of
``--reps`` after warm-up). Where fla's gated backward is known to be wrong (see
``ssd_fla.fla_stack_problem``) its backward is timed only with ``--lift-fla-guard``, which lifts
fla's own refusal in this process: the gradients are then wrong and the figure is a timing of
what a fixed Triton would run, nothing more.

    python benchmarks/ssd_kernels.py --lift-fla-guard
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch
import torch.nn.functional as F


def inputs(b=8, l=2048, h=32, p=64, n=128, g=1, device="cuda"):
    torch.manual_seed(0)
    bf = dict(device=device, dtype=torch.bfloat16)
    return dict(
        x=torch.randn(b, l, h, p, **bf), dt=torch.randn(b, l, h, **bf),
        A=-torch.rand(h, device=device) * 15 - 1, B=torch.randn(b, l, g, n, **bf),
        C=torch.randn(b, l, g, n, **bf), D=torch.ones(h, device=device),
        dt_bias=torch.randn(h, device=device) * 0.5 - 4)


def ssd_mamba_ssm(x, dt, A, B, C, D, dt_bias):
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    return mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size=256, D=D, dt_bias=dt_bias,
                                     dt_softplus=True)


def ssd_fla(x, dt, A, B, C, D, dt_bias):
    from mamba_train.models.ssd_fla import gla_ssd
    dts = F.softplus(dt.float() + dt_bias)
    y = gla_ssd((x * dts.unsqueeze(-1)).to(x.dtype), dts * A, B, C)
    return (y.float() + x.float() * D.unsqueeze(-1)).to(x.dtype)


def time_ms(fn, reps: int, warmup: int = 3) -> float:
    times = []
    for i in range(warmup + reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(end))
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--lift-fla-guard", action="store_true")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    from mamba_train.models.ssd_fla import fla_stack_problem
    problem = fla_stack_problem()
    if problem and args.lift_fla_guard:
        import fla.ops.common.chunk_o as chunk_o
        chunk_o.TRITON_ABOVE_3_7_1 = True  # fla's guard reads this module global at call time
    t = inputs()
    grads = {k: v.requires_grad_() for k, v in t.items() if v.is_floating_point()}
    for name, fn in (("mamba_ssm", ssd_mamba_ssm), ("fla", ssd_fla)):
        fwd = time_ms(lambda: fn(**t), args.reps)
        note = ""
        if name == "fla" and problem and not args.lift_fla_guard:
            both, note = float("nan"), " (backward not run: " + problem + ")"
        else:
            y0 = fn(**t)
            dy = torch.randn_like(y0)
            both = time_ms(lambda: torch.autograd.grad(fn(**t), list(grads.values()), dy), args.reps)
            if name == "fla" and problem:
                note = " (fla guard lifted: gradients known wrong on this Triton, timing only)"
        print(f"SSDKERNEL {name} fwd {fwd:.2f} ms | fwd+bwd {both:.2f} ms{note}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
