"""Launch configurations of mamba_ssm's SSD chunk kernels on this GPU: its autotune lists vs wider ones.

mamba_ssm autotunes each SSD kernel over a fixed list of tile sizes, stages and warps. This times
one mamba2-370m layer's SSD (``mamba_chunk_scan_combined`` forward + backward, micro-batch 8 x 2048)
per kernel with the lists as shipped, then adds the tile/stage/warp combinations they lack (same
meta-parameters, so the kernels' maths are unchanged), re-tunes, and times again in the same
process. Prints per kernel ``SSDCFG <kernel> shipped <ms> | widened <ms> | <chosen config>`` and the
total, plus the extra autotune seconds the wider lists cost.

    python benchmarks/ssd_configs.py [TOP]   # widen the TOP (default 4) heaviest kernels
"""

from __future__ import annotations

import collections
import itertools
import sys
import time

import torch

from ssd_kernels import inputs, ssd_mamba_ssm, time_ms


def ssd_autotuners():
    """{name: Autotuner} for every autotuned kernel in mamba_ssm's SSD modules."""
    from triton.runtime.autotuner import Autotuner
    from mamba_ssm.ops.triton import ssd_bmm, ssd_chunk_scan, ssd_chunk_state, ssd_combined, ssd_state_passing
    found = {}
    for mod in (ssd_bmm, ssd_chunk_scan, ssd_chunk_state, ssd_combined, ssd_state_passing):
        for name, obj in vars(mod).items():
            if isinstance(obj, Autotuner):
                found[name] = obj
    return found


def widen(tuner) -> int:
    """Add the M/N/K tile x stages x warps combinations the shipped list lacks; returns how many."""
    import triton
    base = tuner.configs
    keys = [k for k in ("BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K", "BLOCK_SIZE_CS")
            if all(k in c.kwargs for c in base)]
    if len(keys) < 2:
        return 0
    seen = {(tuple(c.kwargs[k] for k in keys), c.num_stages, c.num_warps) for c in base}
    hook = base[0].pre_hook
    extra = []
    for tiles in itertools.product(*([(64, 128)] * 2 + [(32, 64)] * (len(keys) - 2))):
        for stages, warps in itertools.product((3, 4), (4, 8)):
            if (tiles, stages, warps) not in seen:
                extra.append(triton.Config(dict(zip(keys, tiles)), num_stages=stages,
                                           num_warps=warps, pre_hook=hook))
    tuner.configs = list(base) + extra
    tuner.cache = {}
    return len(extra)


def per_kernel_ms(fn, steps=5) -> dict[str, float]:
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    out = collections.Counter()
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA and not getattr(e, "is_user_annotation", False):
            out[e.name] += e.time_range.elapsed_us() / 1e3 / steps
    return out


def main(top: int = 4) -> int:
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    t = inputs()
    grads = [v.requires_grad_() for v in t.values() if v.is_floating_point()]
    y = ssd_mamba_ssm(**t)
    dy = torch.randn_like(y)
    step = lambda: torch.autograd.grad(ssd_mamba_ssm(**t), grads, dy)
    tuners = ssd_autotuners()
    t0 = time.time()
    step()
    torch.cuda.synchronize()
    print(f"SSDCFG shipped lists: first step (autotune) {time.time() - t0:.1f} s", flush=True)
    before, total0 = per_kernel_ms(step), time_ms(step, 10)
    chosen0 = {n: str(tu.best_config) for n, tu in tuners.items() if getattr(tu, "best_config", None)}
    # only the heaviest kernels: every added config is one more Triton compile at the first step
    heavy = [n for n in sorted(before, key=lambda n: -before[n]) if n in tuners][:top]
    added = sum(widen(tuners[n]) for n in heavy)
    print(f"SSDCFG widening {heavy}", flush=True)
    t0 = time.time()
    step()
    torch.cuda.synchronize()
    print(f"SSDCFG widened lists (+{added} configs): first step (autotune) {time.time() - t0:.1f} s", flush=True)
    after, total1 = per_kernel_ms(step), time_ms(step, 10)
    for name in sorted(before, key=lambda n: -before[n])[:14]:
        short = name.split("(")[0][:48]
        print(f"SSDCFG {short:48s} shipped {before[name]:7.3f} | widened {after.get(name, 0):7.3f} ms")
    for n in heavy:
        tu = tuners[n]
        if getattr(tu, "best_config", None) is not None:
            print(f"SSDCFG best {n}: shipped {chosen0.get(n, '?')} | widened {tu.best_config}")
    print(f"SSDCFG total fwd+bwd: shipped {total0:.3f} ms | widened {total1:.3f} ms | "
          f"shipped/widened {total0 / total1:.3f}x", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 4))
