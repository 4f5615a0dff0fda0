"""FSDP (``strategy=fsdp``, FSDP1 through Lightning's FSDPStrategy) against FSDP2
(``strategy=fsdp2``, ``fully_shard``; context-parallel size 1) on CPU: 2 gloo processes through
the real CLI against one process with the same global batch.

Per arm it prints the ``train/global_loss`` of every step and its largest difference from the
one-process run, per rank: RSS (the largest at an optimizer step before the first checkpoint,
and the peak of the whole run, checkpoint gathers included) and the bytes of parameters,
gradients and optimizer state the rank holds itself (its shard: the storages of each tensor counted once, DTensors by their
local part), the median step time after warm-up, and the checkpoints' format and size. Then a
full checkpoint of each strategy is resumed on the other (``fsdp -> fsdp2``, ``fsdp2 -> fsdp``)
and so is a one-process checkpoint on each and an FSDP one in one process; the continued
losses are compared with the straight runs.

    python benchmarks/sharding_cpu.py --json /tmp/sharding_cpu.json
    python benchmarks/sharding_cpu.py --arms single fsdp fsdp2 fsdp2_no_reshard --steps 10

The measurements come from a callback (``CPUProbe`` below) that each run loads through
``+callbacks.cpu_probe._target_=sharding_cpu.CPUProbe`` with this folder on ``PYTHONPATH``; it
writes one JSON per rank. CPU numbers say nothing about GPU speed: the comparison here is
parity, memory held per rank and checkpoint interchange (GPU timings: ``scaling.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from harness import global_losses  # benchmarks/ is the script's directory

ARMS = {  # name -> (processes, strategy overrides)
    "single": (1, ["strategy=auto"]),
    "fsdp": (2, ["strategy=fsdp"]),
    "fsdp2": (2, ["strategy=fsdp2", "strategy.context_parallel_size=1"]),
    "fsdp_sharded_ckpt": (2, ["strategy=fsdp", "strategy.state_dict_type=sharded"]),
    "fsdp2_sharded_ckpt": (2, ["strategy=fsdp2", "strategy.state_dict_type=sharded"]),
    "fsdp_shard_grad_op": (2, ["strategy=fsdp", "strategy.sharding_strategy=SHARD_GRAD_OP"]),
    "fsdp2_no_reshard": (2, ["strategy=fsdp2", "strategy.reshard_after_forward=false"]),
    "fsdp_ac": (2, ["strategy=fsdp", "module.activation_checkpointing=all"]),
    "fsdp2_ac": (2, ["strategy=fsdp2", "module.activation_checkpointing=all"]),
}
# checkpoint of the first (full, at steps/2), resumed on the second
RESUMES = [("fsdp", "fsdp2"), ("fsdp2", "fsdp"), ("single", "fsdp"), ("single", "fsdp2"), ("fsdp", "single")]


# ------------------------------------------------------------------------------ in each rank
def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t  # a DTensor's shard on this rank


def held_bytes(tensors) -> int:
    """Bytes of the storages behind ``tensors``, each storage once (FSDP1's parameters and
    gradients are views into one flat shard per unit)."""
    storages = {}
    for t in tensors:
        if isinstance(t, torch.Tensor):
            s = _local(t).untyped_storage()
            storages[s.data_ptr()] = s.nbytes()
    return sum(storages.values())


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class CPUProbe(L.Callback):
    """Per rank: the time of every optimizer step, the bytes it holds, its peak RSS."""

    def __init__(self, out: str):
        self.out = Path(out)
        self.stamps: list[float] = []
        self.held = {"params": 0, "grads": 0, "optimizer_state": 0}
        self.rss: list[int] = []
        self.start_rss = 0

    def on_train_start(self, trainer, pl_module):
        self.start_rss = _rss_bytes()  # the model set up and sharded, before the first step

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.stamps.append(time.perf_counter())
        params = list(pl_module.parameters())
        state = [v for s in optimizer.state.values() for v in s.values()
                 if isinstance(v, torch.Tensor) and v.dim() > 0]  # not Adam's step counter
        now = {"params": held_bytes(params), "grads": held_bytes(p.grad for p in params),
               "optimizer_state": held_bytes(state)}
        self.held = {k: max(v, now[k]) for k, v in self.held.items()}
        self.rss.append(_rss_bytes())

    def on_train_end(self, trainer, pl_module):
        import resource

        self.out.mkdir(parents=True, exist_ok=True)
        steps = [b - a for a, b in zip(self.stamps, self.stamps[1:])]
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps({
            "rank": trainer.global_rank, "world_size": trainer.world_size,
            "strategy": type(trainer.strategy).__name__,
            "accumulation": trainer.accumulate_grad_batches, "step_s": steps,
            "held_bytes": self.held, "rss_bytes": self.rss, "start_rss_bytes": self.start_rss,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


# ------------------------------------------------------------------------------ orchestration
def common_overrides(args) -> list[str]:
    return [f"recipe={args.recipe}", "backend=reference", "trainer.accelerator=cpu",
            f"data.seq_len={args.seq_len}", f"data.micro_batch_size={args.micro_batch}",
            f"train.global_batch_tokens={args.global_batch_tokens}", "data.num_workers=0",
            f"trainer.max_steps={args.steps}", "trainer.limit_val_batches=0",
            "train.val_every_n_steps=1000000", f"train.checkpoint_every_n_steps={args.steps // 2}",
            "train.keep_last_k_checkpoints=-1", "logger=csv", "trainer.log_every_n_steps=1",
            "callbacks.progress_bar=null", "callbacks.samples=null",
            "trainer.enable_model_summary=false", *args.override]


def run_cli(args, out: Path, name: str, processes: int, extra: list[str]) -> tuple[int, float, str]:
    cmd = [sys.executable, "-m", "mamba_train", *common_overrides(args), f"trainer.devices={processes}",
           *extra, f"+callbacks.cpu_probe._target_={__name__ if __name__ != '__main__' else 'sharding_cpu'}.CPUProbe",
           f"+callbacks.cpu_probe.out={out / name / 'probe'}", f"run_name={name}", f"paths.output_dir={out}"]
    here = str(Path(__file__).resolve().parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([here, os.environ.get("PYTHONPATH", "")]),
           "HYDRA_FULL_ERROR": "1"}
    print(f"== {name}: python -m mamba_train {' '.join(cmd[3:])}", flush=True)
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    (out / f"{name}.log").write_text(proc.stdout + "\n" + proc.stderr)
    tail = (proc.stderr.strip().splitlines() or ["?"])[-1][-300:]
    return proc.returncode, time.time() - t0, tail


def checkpoint_info(run_dir: Path, step: int) -> dict:
    path = run_dir / "checkpoints" / f"step{step:07d}.ckpt"
    if path.is_dir():
        files = [p for p in path.rglob("*") if p.is_file()]
        return {"path": str(path), "format": f"directory, {len(files)} files "
                f"({len(list(path.glob('*.distcp')))} .distcp)", "bytes": sum(p.stat().st_size for p in files)}
    if path.is_file():
        return {"path": str(path), "format": "one file", "bytes": path.stat().st_size}
    return {"path": str(path), "format": "missing", "bytes": 0}


def summarize(args, out: Path, name: str) -> dict:
    ranks = [json.loads(p.read_text()) for p in sorted((out / name / "probe").glob("rank*.json"))]
    warm = args.warmup
    for r in ranks:  # RSS at the optimizer steps before the first checkpoint's gather and save
        r["step_rss_bytes"] = max(r["rss_bytes"][:args.steps // 2] or [0])
    return {"arm": name, "losses": global_losses(out / name),
            "ranks": ranks, "checkpoint": checkpoint_info(out / name, args.steps // 2),
            "median_step_s": statistics.median([s for r in ranks for s in r["step_s"][warm:]] or [float("nan")])}


def max_diff(a: dict, b: dict) -> tuple[float, list[int]]:
    common = sorted(set(a) & set(b))
    return (max((abs(a[s] - b[s]) for s in common), default=float("nan")), common)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="debug-mamba2", help="debug-mamba2 or debug-hybrid")
    ap.add_argument("--arms", nargs="+", default=["single", "fsdp", "fsdp2"], choices=list(ARMS))
    ap.add_argument("--steps", type=int, default=16, help="checkpoints at steps/2 (the resumes' start)")
    ap.add_argument("--warmup", type=int, default=2, help="step intervals left out of the median")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--global-batch-tokens", type=int, default=2048,
                    help="tokens per optimizer step (default: accumulation 2 on 1 process, 1 on 2)")
    ap.add_argument("--no-resume", action="store_true", help="skip the cross-strategy resumes")
    ap.add_argument("--override", action="append", default=[], help="extra Hydra override for every run")
    ap.add_argument("--out", type=Path, default=None, help="run directory (default: a temporary one)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    out = (args.out or Path(tempfile.mkdtemp(prefix="mamba_sharding_cpu_"))).resolve()
    arms = ["single", *[a for a in args.arms if a != "single"]]

    results, failed = {}, {}
    for arm in arms:
        processes, extra = ARMS[arm]
        rc, wall, tail = run_cli(args, out, arm, processes, extra)
        if rc != 0:
            failed[arm] = f"exit {rc}: {tail}"
            print(f"   FAILED ({failed[arm]}); log {out / (arm + '.log')}", flush=True)
            continue
        results[arm] = summarize(args, out, arm)
        results[arm]["wall_s"] = wall
        print(f"   done in {wall:.0f} s", flush=True)

    resumes = {}
    for src, dst in ([] if args.no_resume else RESUMES):
        if src not in results or dst not in results:
            continue
        name = f"{src}_to_{dst}"
        ckpt = out / src / "checkpoints" / f"step{args.steps // 2:07d}.ckpt"
        rc, wall, tail = run_cli(args, out, name, ARMS[dst][0], [*ARMS[dst][1], f"ckpt_path={ckpt}"])
        if rc != 0:
            failed[name] = f"exit {rc}: {tail}"
            print(f"   FAILED ({failed[name]}); log {out / (name + '.log')}", flush=True)
            continue
        resumes[name] = {"losses": global_losses(out / name), "src": src, "dst": dst}

    base = results.get("single")
    print(f"\nSHARDING_CPU {args.recipe}: reference backend, fp32, CPU, seq {args.seq_len}, micro-batch "
          f"{args.micro_batch}, {args.global_batch_tokens} tokens/step, {args.steps} steps "
          f"(median step time after {args.warmup}), torch {torch.__version__}, lightning {L.__version__}")
    for name, r in results.items():
        d, _ = max_diff(r["losses"], base["losses"]) if base else (float("nan"), [])
        print(f"SHARDING_CPU arm={name} processes={len(r['ranks'])} accumulation={r['ranks'][0]['accumulation']} "
              f"strategy={r['ranks'][0]['strategy']} steps={len(r['losses'])} max|dloss vs single|={d:.2e} "
              f"median_step_s={r['median_step_s']:.3f} wall_s={r['wall_s']:.0f} "
              f"ckpt_step{args.steps // 2}={r['checkpoint']['format']}, {r['checkpoint']['bytes'] / 2**20:.2f} MiB")
        for k in r["ranks"]:
            h = k["held_bytes"]
            print(f"SHARDING_CPU_RANK arm={name} rank={k['rank']} params_MiB={h['params'] / 2**20:.2f} "
                  f"grads_MiB={h['grads'] / 2**20:.2f} optim_MiB={h['optimizer_state'] / 2**20:.2f} "
                  f"held_MiB={sum(h.values()) / 2**20:.2f} rss_at_start_MiB={k['start_rss_bytes'] / 2**20:.0f} rss_before_ckpt_MiB={k['step_rss_bytes'] / 2**20:.0f} "
                  f"peak_rss_MiB={k['peak_rss_bytes'] / 2**20:.0f}")
    names = list(results)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            d, common = max_diff(results[a]["losses"], results[b]["losses"])
            exact = sum(results[a]["losses"][s] == results[b]["losses"][s] for s in common)
            print(f"SHARDING_CPU_PAIR {a} vs {b}: max|dloss|={d:.2e} over {len(common)} steps, "
                  f"bit-identical at {exact}")
    for name, r in resumes.items():
        cont = sorted(r["losses"])
        vs = {k: max_diff(r["losses"], results[k]["losses"]) for k in (r["src"], r["dst"], "single") if k in results}
        exact = sum(r["losses"][s] == results[r["dst"]]["losses"].get(s) for s in cont)
        print(f"SHARDING_CPU_RESUME {name}: steps {cont[0] if cont else '-'}-{cont[-1] if cont else '-'} "
              + " ".join(f"max|dloss vs {k}|={d:.2e}" for k, (d, _) in vs.items())
              + f" bit-identical to {r['dst']} at {exact} of {len(cont)}")
    for name, r in results.items():
        print(f"SHARDING_CPU_LOSS arm={name} " + " ".join(f"{s}:{v:.6f}" for s, v in sorted(r["losses"].items())))
    for name, r in resumes.items():
        print(f"SHARDING_CPU_LOSS resume={name} " + " ".join(f"{s}:{v:.6f}" for s, v in sorted(r["losses"].items())))
    for name, why in failed.items():
        print(f"SHARDING_CPU FAILED {name}: {why}")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                         "results": results, "resumes": resumes, "failed": failed},
                                        indent=2, default=str))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
