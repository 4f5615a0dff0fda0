"""Per-layer Mamba-2 SSD forward + backward: mamba_ssm's Functions against ``kernels.ssd=mamba_train``
(models/ssd.py, models/ssd_split.py), one process, one GPU, alternating windows.

Arms, at mamba2-370m's mixer shape by default (batch 8, length 2048, 32 heads x headdim 64,
d_state 128, ngroups 1, chunk 256, bf16 under autocast):
  scan   the SSD alone: ``mamba_chunk_scan_combined`` vs ``models.ssd.ssd_chunk_scan``
  split  the fused mixer body (conv1d + SSD + gated RMSNorm + out_proj):
         ``mamba_split_conv1d_scan_combined`` vs ``models.ssd_split.split_conv1d_scan_kept``
  each as mamba_ssm / mamba_train (no recomputation) / mamba_train+dcb_ddA / mamba_train+all
  (``ssd.fused_kernels``: two or three backward kernels as one of ours) / mamba_train+fwd
  (``ssd.forward_kernels=fused``: the forward's chunk_state + state_passing + chunk_scan as
  models/ssd_fwd_kernel.py, mamba_ssm's backward kernels)
  fwd    the SSD forward alone, no autograd: mamba_ssm's own (states kept in bf16) vs
         models/ssd.py's ssd_forward with forward_kernels=mamba_ssm (its five kernels) and
         =fused (cumsum + CB + ours); then the three replaced kernels alone against ours
         (autotuned, and with --sweep each BLOCK_P x warps x stages x block_m)
  kernel mamba_ssm's _chunk_scan_chunk_state_bwd_dx + _chunk_scan_bwd_dcb +
         _chunk_scan_bwd_ddAcs_stable vs models/ssd_bwd_kernel.py (+ mamba_ssm's dx) vs
         models/ssd_bwd_fused.py, with --sweep over their block x num_warps x num_stages
Each line: median fwd+bwd ms over the windows, the ratio to mamba_ssm's arm measured in the same
run, the activation bytes the forward leaves for the backward and the peak memory of one step.

    python benchmarks/ssd_backward.py [--batch 8 --length 2048 --windows 5 --iters 20 --sweep]
    (on the device: BUDGET_S=540 bash benchmarks/device_call.sh ssdbwd; the forward: ssdfwd)
"""

from __future__ import annotations

import argparse
import statistics

import torch

DEV = "cuda"


def scan_arms(a):
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    from mamba_train.models.ssd import ssd_chunk_scan
    g = torch.Generator(DEV).manual_seed(0)
    bf = dict(device=DEV, dtype=torch.bfloat16)
    shape = (a.batch, a.length)
    leaves = dict(
        x=torch.randn(*shape, a.heads, a.headdim, generator=g, **bf),
        dt=torch.randn(*shape, a.heads, generator=g, **bf),
        A=-torch.rand(a.heads, device=DEV, generator=g) - 0.5,
        B=torch.randn(*shape, a.ngroups, a.d_state, generator=g, **bf),
        C=torch.randn(*shape, a.ngroups, a.d_state, generator=g, **bf),
        D=torch.randn(a.heads, device=DEV, generator=g),
        dt_bias=torch.randn(a.heads, device=DEV, generator=g))
    for t in leaves.values():
        t.requires_grad_()
    dout = torch.randn(*shape, a.heads, a.headdim, generator=g, **bf)

    def arm(fn):
        def fwd():
            v = leaves
            return fn(v["x"], v["dt"], v["A"], v["B"], v["C"], a.chunk, D=v["D"],
                      dt_bias=v["dt_bias"], dt_softplus=True)
        return fwd
    return {"mamba_ssm": (arm(mamba_chunk_scan_combined), "none", "mamba_ssm"),
            **_ours(arm(ssd_chunk_scan))}, leaves, dout


def split_arms(a):
    from mamba_ssm.ops.triton.ssd_combined import mamba_split_conv1d_scan_combined

    from mamba_train.models.ssd_split import split_conv1d_scan_kept
    g = torch.Generator(DEV).manual_seed(0)
    dim = a.heads * a.headdim
    chans = dim + 2 * a.ngroups * a.d_state
    d_model = dim // 2
    leaves = dict(
        zxbcdt=torch.randn(a.batch, a.length, 2 * dim + 2 * a.ngroups * a.d_state + a.heads,
                           generator=g, device=DEV, dtype=torch.bfloat16),
        w=torch.randn(chans, 4, device=DEV, generator=g) * 0.3,
        bias=torch.randn(chans, device=DEV, generator=g) * 0.1,
        dt_bias=torch.randn(a.heads, device=DEV, generator=g),
        A=-torch.rand(a.heads, device=DEV, generator=g) - 0.5,
        D=torch.randn(a.heads, device=DEV, generator=g),
        norm_w=torch.rand(dim, device=DEV, generator=g) + 0.5,
        out_w=torch.randn(d_model, dim, device=DEV, generator=g) * 0.02)
    for t in leaves.values():
        t.requires_grad_()
    dout = torch.randn(a.batch, a.length, d_model, generator=g, device=DEV, dtype=torch.bfloat16)

    def arm(fn):
        def fwd():
            v = leaves
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return fn(v["zxbcdt"], v["w"], v["bias"], v["dt_bias"], v["A"], v["D"], a.chunk,
                          rmsnorm_weight=v["norm_w"], rmsnorm_eps=1e-5, outproj_weight=v["out_w"],
                          headdim=a.headdim, ngroups=a.ngroups, norm_before_gate=False)
        return fwd
    return {"mamba_ssm": (arm(mamba_split_conv1d_scan_combined), "none", "mamba_ssm"),
            **_ours(arm(split_conv1d_scan_kept))}, leaves, dout


def _ours(fwd):
    """models/ssd.py's Function with each backward choice, and with the fused forward."""
    return {"mamba_train": (fwd, "none", "mamba_ssm"),
            "mamba_train+dcb_ddA": (fwd, "dcb_ddA", "mamba_ssm"),
            "mamba_train+all": (fwd, "all", "mamba_ssm"),
            "mamba_train+fwd": (fwd, "none", "fused")}


def step(arm, leaves, dout):
    from mamba_train.models import ssd
    fwd, ssd.fused_kernels, ssd.forward_kernels = arm
    for t in leaves.values():
        t.grad = None
    fwd().backward(dout)


def memory(arm, leaves, dout):
    """(bytes the forward keeps for the backward, peak bytes above the start of one step)."""
    from mamba_train.models import ssd
    fwd, ssd.fused_kernels, ssd.forward_kernels = arm
    for t in leaves.values():
        t.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fwd()
    kept = torch.cuda.memory_allocated() - base - out.numel() * out.element_size()
    out.backward(dout)
    torch.cuda.synchronize()
    return kept, torch.cuda.max_memory_allocated() - base


def time_windows(arms, windows, iters, run):
    """Median ms per call of run(arm) for each arm, windows alternating between the arms."""
    times = {name: [] for name in arms}
    for _ in range(windows):
        for name, arm in arms.items():  # alternating, so drift hits every arm alike
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                run(arm)
            end.record()
            torch.cuda.synchronize()
            times[name].append(start.elapsed_time(end) / iters)
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for k, v in dict(batch=8, length=2048, heads=32, headdim=64, d_state=128, ngroups=1,
                     chunk=256, windows=5, iters=20, warmup=3).items():
        p.add_argument(f"--{k.replace('_', '-')}", type=int, default=v)
    p.add_argument("--arms", nargs="+", default=["kernel", "scan", "split"],
                   choices=["kernel", "scan", "split", "fwd"])
    p.add_argument("--sweep", action="store_true", help="kernel arm: every block x num_warps x "
                   "num_stages of models/ssd_bwd_kernel.py and models/ssd_bwd_fused.py; fwd arm: "
                   "every setting x block_m of models/ssd_fwd_kernel.py")
    a = p.parse_args(argv)
    print(f"SSDBWD device {torch.cuda.get_device_name()} shape batch={a.batch} len={a.length} "
          f"heads={a.heads}x{a.headdim} d_state={a.d_state} groups={a.ngroups} chunk={a.chunk}")
    for which in a.arms:
        if which in ("kernel", "fwd"):
            (kernel_arm if which == "kernel" else fwd_arm)(a)
            continue
        arms, leaves, dout = (scan_arms if which == "scan" else split_arms)(a)
        for arm in arms.values():  # autotuning and first compiles outside the windows
            for _ in range(a.warmup):
                step(arm, leaves, dout)
        mem = {name: memory(arm, leaves, dout) for name, arm in arms.items()}
        ms = time_windows(arms, a.windows, a.iters, lambda arm: step(arm, leaves, dout))
        base = ms["mamba_ssm"]
        for name in arms:
            kept, peak = mem[name]
            print(f"SSDBWD {which:5s} {name:17s} fwd+bwd {ms[name]:.3f} ms/layer "
                  f"ratio {ms[name] / base:.3f} vs mamba_ssm, saved for bwd {kept / 2**20:.1f} MiB, "
                  f"step peak {peak / 2**20:.1f} MiB")


def kernel_arm(a):
    """mamba_ssm's dx + dcb + ddAcs_stable kernels vs ssd_bwd_kernel (+ mamba_ssm's dx) vs
    ssd_bwd_fused, on the same inputs."""
    import itertools

    from mamba_ssm.ops.triton import ssd_chunk_scan as up
    from mamba_ssm.ops.triton.ssd_bmm import _bmm_chunk_fwd
    from mamba_ssm.ops.triton.ssd_chunk_state import _chunk_cumsum_fwd
    from mamba_ssm.ops.triton.ssd_combined import _chunk_scan_chunk_state_bwd_dx

    from mamba_train.models import ssd_bwd_fused as f
    from mamba_train.models import ssd_bwd_kernel as k
    g = torch.Generator(DEV).manual_seed(0)
    bf = dict(device=DEV, dtype=torch.bfloat16)
    shape = (a.batch, a.length)
    x = torch.randn(*shape, a.heads, a.headdim, generator=g, **bf)
    dout = torch.randn(*shape, a.heads, a.headdim, generator=g, **bf)
    B = torch.randn(*shape, a.ngroups, a.d_state, generator=g, **bf)
    C = torch.randn(*shape, a.ngroups, a.d_state, generator=g, **bf)
    nchunks = -(-a.length // a.chunk)
    dstates = torch.randn(a.batch, nchunks, a.heads, a.headdim, a.d_state, generator=g, **bf)
    D = torch.randn(a.heads, device=DEV, generator=g)
    dA_cumsum, dt = _chunk_cumsum_fwd(torch.randn(*shape, a.heads, generator=g, **bf),
                                      -torch.rand(a.heads, device=DEV) - 0.5, a.chunk,
                                      dt_bias=torch.randn(a.heads, device=DEV), dt_softplus=True)
    CB = _bmm_chunk_fwd(C, B, a.chunk, output_dtype=torch.float32)
    defaults = {"dcb_ddA": (k.block_m, k.num_warps, k.num_stages),
                "all": (f.block_n, f.num_warps, f.num_stages)}
    arms = {"mamba_ssm dx+dcb+ddA": ("none", None)}
    for which, setting in defaults.items():
        arms[f"{which} {setting}"] = (which, setting)
        if a.sweep:
            arms.update({f"{which} {s}": (which, s)
                         for s in itertools.product((16, 32, 64), (4, 8), (1, 2))})

    def run(arm):
        which, setting = arm
        if which != "all":
            _chunk_scan_chunk_state_bwd_dx(x, dt, dA_cumsum, B, CB, dout, dstates, D=D)
        if which == "none":
            up._chunk_scan_bwd_dcb(x, dt, dA_cumsum, dout, ngroups=a.ngroups)
            up._chunk_scan_bwd_ddAcs_stable(x, dt, dA_cumsum, dout, CB)
        elif which == "dcb_ddA":
            k.block_m, k.num_warps, k.num_stages = setting
            k.chunk_scan_bwd_dcb_ddA(x, dt, dA_cumsum, dout, CB)
        else:
            f.block_n, f.num_warps, f.num_stages = setting
            f.chunk_scan_bwd_fused(x, dt, dA_cumsum, B, CB, dout, dstates, D=D)
    for name, arm in list(arms.items()):
        try:
            for _ in range(a.warmup):
                run(arm)
            torch.cuda.synchronize()
        except Exception as e:  # a setting the compiler cannot fit (shared memory, registers)
            print(f"SSDBWD kernel {name} not run: {type(e).__name__}: {str(e)[:160]}")
            del arms[name]
    ms = time_windows(arms, a.windows, a.iters, run)
    k.block_m, k.num_warps, k.num_stages = defaults["dcb_ddA"]
    f.block_n, f.num_warps, f.num_stages = defaults["all"]
    base = ms["mamba_ssm dx+dcb+ddA"]
    for name in sorted(arms, key=ms.get):
        print(f"SSDBWD kernel {name:24s} {ms[name]:.3f} ms/layer ratio {ms[name] / base:.3f} "
              "vs mamba_ssm (block, warps, stages)")


def fwd_arm(a):
    """The SSD forward without autograd, whole (cumsum and CB included) and the replaced kernels
    alone, on the scan arm's inputs."""
    import itertools

    from mamba_ssm.ops.triton.ssd_bmm import _bmm_chunk_fwd
    from mamba_ssm.ops.triton.ssd_chunk_scan import _chunk_scan_fwd
    from mamba_ssm.ops.triton.ssd_chunk_state import _chunk_cumsum_fwd, _chunk_state_fwd
    from mamba_ssm.ops.triton.ssd_combined import _mamba_chunk_scan_combined_fwd
    from mamba_ssm.ops.triton.ssd_state_passing import _state_passing_fwd

    from mamba_train.models import ssd, ssd_fwd_kernel
    _, leaves, _ = scan_arms(a)
    x, dt, A, B, C, D, bias = (leaves[k].detach() for k in ("x", "dt", "A", "B", "C", "D",
                                                             "dt_bias"))
    kw = dict(D=D, dt_bias=bias, dt_softplus=True)

    def whole(choice):
        def run():
            ssd.forward_kernels = choice
            ssd.ssd_forward(x, dt, A, B, C, a.chunk, **kw)
        return run
    dA_cumsum, dtc = _chunk_cumsum_fwd(dt, A, a.chunk, dt_bias=bias, dt_softplus=True)
    CB = _bmm_chunk_fwd(C, B, a.chunk, output_dtype=torch.float32)

    def upstream_three():
        st = _chunk_state_fwd(B, x, dtc, dA_cumsum, states_in_fp32=True)
        st, _ = _state_passing_fwd(st.flatten(-2), dA_cumsum[:, :, :, -1], chunk_size=a.chunk,
                                   out_dtype=torch.float32)
        _chunk_scan_fwd(CB, x, dtc, dA_cumsum, C, st.unflatten(-1, (a.headdim, a.d_state)), D=D)

    def ours(config=None, block_m=None):
        def run():
            ssd_fwd_kernel.block_m = block_m or default_block_m
            ssd_fwd_kernel.ssd_fwd_fused(x, dtc, dA_cumsum, CB, B, C, D=D, config=config)
        return run
    default_block_m = ssd_fwd_kernel.block_m
    arms = {"whole mamba_ssm own": lambda: _mamba_chunk_scan_combined_fwd(x, dt, A, B, C, a.chunk,
                                                                          **kw),
            "whole forward_kernels=mamba_ssm": whole("mamba_ssm"),
            "whole forward_kernels=fused": whole("fused"),
            "three mamba_ssm kernels": upstream_three,
            "three as ours (autotuned)": ours()}
    if a.sweep:
        arms.update({f"three as ours {(p, w, s)} block_m={m}": ours((p, w, s), m)
                     for p, w, s, m in itertools.product((16, 32, 64), (4, 8), (1, 2),
                                                         (16, 32, 64))})
    for name, run in list(arms.items()):
        try:
            for _ in range(a.warmup):
                run()
            torch.cuda.synchronize()
        except Exception as e:  # a setting the compiler cannot fit (shared memory, registers)
            print(f"SSDBWD fwd {name} not run: {type(e).__name__}: {str(e)[:160]}")
            del arms[name]
    ms = time_windows(arms, a.windows, a.iters, lambda run: run())
    ssd.forward_kernels, ssd_fwd_kernel.block_m = "mamba_ssm", default_block_m
    for part in ("whole", "three"):
        base = ms["whole mamba_ssm own" if part == "whole" else "three mamba_ssm kernels"]
        for name in sorted((n for n in ms if n.startswith(part)), key=ms.get):
            print(f"SSDBWD fwd {name:40s} {ms[name]:.3f} ms/layer ratio {ms[name] / base:.3f} "
                  f"vs mamba_ssm (BLOCK_P, warps, stages)")


if __name__ == "__main__":
    main()
