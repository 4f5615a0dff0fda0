"""Where a training step's GPU time goes: mamba_train's path against the plain loop, per kernel.

``train_throughput.py`` says how fast each arm is; this says why. For one model and micro-batch
it profiles ``--steps`` optimizer steps after warm-up of (a) the plain loop and (b) mamba_train's
path once per ``--cuda-graph`` setting, with ``torch.profiler`` recording GPU activity only, and
prints per arm:

  PROFILE <arm>: wall ms/step, GPU busy ms/step (union of kernel/memcpy/memset intervals),
                 idle share of the wall time, kernels per step
  GAP     the five longest idle stretches in the window, between which kernels
  KERNEL  <name>: ms/step in (a), ms/step in (b), difference -- the largest differences first
  BUDGET  a markdown table: ms/step per kernel family and arm against the matmul-only lower
          bound (``kernel_budget.py``); ``--variant LABEL:OVERRIDE`` adds a column
  OPS     with ``--ops N``: the N aten operators with the most GPU time per step and their input
          shapes (eager arms only: a graph replay has no operators). This is what names the
          source of anonymous kernels such as ``vectorized_elementwise_kernel``; the host-side
          recording slows the wall time of those arms, so read their PROFILE line for GPU time only

Busy time is the union of intervals, so overlapping streams are not counted twice; idle time
is what the host (or a sync) left the GPU waiting. With ``cuda_graph=on`` the kernels inside a
replay are listed only where CUPTI reports graph kernels; the kernel count says whether it did.

    python benchmarks/profile_step.py --model mamba-370m --micro-batch 8 --cuda-graph off auto
    python benchmarks/profile_step.py --model mamba2-370m --cuda-graph auto \
        --variant fla:kernels.ssd=fla --peak-flops 989e12
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel_budget import print_budget  # noqa: E402
from harness import framework, plain_loop, ready_cuda, synthetic_shards  # noqa: E402


class StepWindowProfiler:
    """Profiles steps ``[start, start + n)``: starts after step ``start - 1``, stops after
    step ``start + n - 1``, with a device sync at both ends so the wall time is exact."""

    def __init__(self, start: int, n: int, ops: int = 0):
        self.start, self.n, self.ops = start, n, ops  # ops: how many operators to report
        self.prof = None
        self.wall_s = None
        self._t0 = 0.0

    def after_step(self, step: int) -> None:
        if step == self.start - 1:
            torch.cuda.synchronize()
            activities = [ProfilerActivity.CUDA] + ([ProfilerActivity.CPU] if self.ops else [])
            self.prof = profile(activities=activities, record_shapes=self.ops > 0)
            self.prof.__enter__()
            self._t0 = time.perf_counter()
        elif step == self.start + self.n - 1 and self.prof is not None:
            torch.cuda.synchronize()
            self.wall_s = time.perf_counter() - self._t0
            self.prof.__exit__(None, None, None)

    def summary(self) -> dict:
        """Per-step wall, busy (interval union) and kernel time by name."""
        # GPU time only: kernels, memcpys, memsets -- not the annotation ranges (e.g. the
        # optimizer's record_function) that CPU recording puts on the GPU timeline too
        events = [e for e in self.prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                  and not getattr(e, "is_user_annotation", False)]
        spans = sorted((e.time_range.start, e.time_range.end) for e in events)
        busy, cur_start, cur_end = 0.0, None, None
        for s, e in spans:
            if cur_end is None or s > cur_end:
                if cur_end is not None:
                    busy += cur_end - cur_start
                cur_start, cur_end = s, e
            else:
                cur_end = max(cur_end, e)
        if cur_end is not None:
            busy += cur_end - cur_start
        # the longest idle stretches, with the kernels on either side: where the GPU waited
        ordered = sorted(events, key=lambda e: e.time_range.start)
        gaps, reach = [], float("-inf")  # reach: the latest end of any interval so far
        for prev, nxt in zip(ordered, ordered[1:]):
            reach = max(reach, prev.time_range.end)
            if nxt.time_range.start > reach:
                gaps.append(((nxt.time_range.start - reach) / 1e3, prev.name, nxt.name))
        gaps.sort(reverse=True)
        by_name = collections.Counter()
        for e in events:
            by_name[e.name] += e.time_range.elapsed_us() / 1e3 / self.n
        wall_ms = self.wall_s * 1e3 / self.n
        return {"wall_ms": wall_ms, "busy_ms": busy / 1e3 / self.n,
                "kernels_per_step": len(events) / self.n, "by_name": by_name, "gaps": gaps[:5],
                "ops": self._ops()[: self.ops] if self.ops else []}

    def _ops(self) -> list[tuple[float, str, str]]:
        """(ms/step of GPU time launched by the op itself, op name, input shapes), aten ops only."""
        rows = []
        for avg in self.prof.key_averages(group_by_input_shape=True):
            if not avg.key.startswith("aten::"):
                continue
            if avg.self_device_time_total > 0:
                rows.append((avg.self_device_time_total / 1e3 / self.n, avg.key,
                             str(avg.input_shapes)))
        return sorted(rows, reverse=True)


class _FrameworkHook(L.Callback):
    def __init__(self, window: StepWindowProfiler):
        self.window = window

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.window.after_step(trainer.global_step - 1)


def _print_arm(label: str, r: dict) -> None:
    idle = 1 - r["busy_ms"] / r["wall_ms"]
    print(f"PROFILE {label}: wall {r['wall_ms']:.1f} ms/step | GPU busy {r['busy_ms']:.1f} ms/step "
          f"| idle {idle:.1%} | {r['kernels_per_step']:.0f} kernels/step", flush=True)
    for ms, before, after in r["gaps"]:
        print(f"GAP {label}: {ms:.2f} ms after {before[:50]} | before {after[:50]}", flush=True)
    for ms, op, shapes in r["ops"]:
        print(f"OPS {label}: {ms:6.2f} ms/step {op} {shapes[:150]}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mamba-370m")
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=6)
    ap.add_argument("--steps", type=int, default=10,
                    help="profiled steps; 10 holds one logged step of the 370m recipes")
    ap.add_argument("--cuda-graph", nargs="+", default=["off", "auto"])
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--ops", type=int, default=0, metavar="N",
                    help="record operators in the eager arms and print the N with the most GPU time")
    ap.add_argument("--override", action="append", default=[], help="extra Hydra override for (b)")
    ap.add_argument("--variant", action="append", default=[], metavar="LABEL:OVERRIDE",
                    help="also profile (b) with cuda_graph=auto and this extra override, e.g. "
                         "fla:kernels.ssd=fla (a column of the kernel budget)")
    ap.add_argument("--skip-plain", action="store_true", help="leave out arm (a)")
    ap.add_argument("--peak-flops", type=float, default=None,
                    help="dense bf16 FLOP/s for the matmul-only bound (e.g. 989e12 for an H200)")
    args = ap.parse_args(argv)
    if not ready_cuda():
        return 2
    total = args.warmup + args.steps
    arms = {}
    if not args.skip_plain:
        window = StepWindowProfiler(args.warmup, args.steps, ops=args.ops)
        # warm-up past the profiled steps: the arms' own timing syncs fall after the window
        plain_loop(args.model, args.micro_batch, total + 1, 0, 1, on_step=window.after_step)
        arms["plain"] = window.summary()
        _print_arm(f"{args.model} mb={args.micro_batch} plain", arms["plain"])
    runs = [(f"cuda_graph={mode}", [f"module.cuda_graph={mode}"]) for mode in args.cuda_graph]
    runs += [(label, ["module.cuda_graph=auto", override])
             for label, override in (v.split(":", 1) for v in args.variant)]
    with tempfile.TemporaryDirectory() as tmp:
        data = synthetic_shards(Path(tmp) / "data")
        for label, extra in runs:
            window = StepWindowProfiler(args.warmup, args.steps,
                                        ops=args.ops if "=off" in label else 0)
            framework(args.model, args.micro_batch, total + 1, 0, 1, data, Path(tmp) / "runs",
                      [*args.override, *extra], tag=f"-{label.replace('=', '-')}",
                      extra_callbacks=[_FrameworkHook(window)])
            arms[label] = window.summary()
            _print_arm(f"{args.model} mb={args.micro_batch} mamba_train {label}", arms[label])
    base = arms.get("plain", {}).get("by_name", collections.Counter())
    for label, _ in (runs if "plain" in arms else []):
        other = arms[label]["by_name"]
        diffs = sorted(set(base) | set(other), key=lambda k: -abs(other[k] - base[k]))
        print(f"-- kernels, plain vs mamba_train {label} (ms/step), largest differences:")
        for k in diffs[: args.top]:
            print(f"KERNEL {k[:90]:<90} plain {base[k]:7.2f} | mamba_train {other[k]:7.2f} "
                  f"| diff {other[k] - base[k]:+7.2f}")
    print_budget(args.model, args.micro_batch, arms, args.peak_flops)
    return 0


if __name__ == "__main__":
    sys.exit(main())
