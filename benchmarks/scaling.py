"""Multi-GPU scaling: a short mamba-370m run on 1 GPU vs DDP and FSDP (and DeepSpeed, if
installed) on 2 GPUs, through ``mamba_train.train.train`` with the same global batch.

Prints per arm: tokens/s (global and per GPU, steady state after warm-up), scaling efficiency
(per-GPU tokens/s over the 1-GPU tokens/s), peak GPU memory, and how far ``train/global_loss``
(the loss of each optimizer step over the whole global batch) is from the 1-GPU run. The 1- and
2-GPU arms see the same samples per optimizer step (the loader deals global sample i to rank
i % world size), so the losses differ only by float summation order and mamba_ssm's
non-deterministic (atomic-add) backward: expect |Δ| around 1e-3, growing slowly with steps.

Data: the embedded default corpus (4096-token BPE) with ``model.vocab_size=4096``; windows repeat
once it is used up, which does not matter for speed. Bf16-mixed (fp32 parameters), fused kernels.

    python3 benchmarks/scaling.py --json $OUT/scaling.json           # on nvidia-h200-x2
    python3 benchmarks/scaling.py --strategies ddp fsdp fsdp2 deepspeed_zero2 --steps 40
    python3 benchmarks/scaling.py --global-batch-tokens 32768 --strategies ddp ddp_allreduce_in_graph ddp_eager

On a GPU machine without internet: copy the prebuilt wheels (mamba_ssm 2.3.2, causal_conv1d 1.7,
hydra-core, omegaconf, antlr4) into .whl/, then
    python3 -m pip install -q --no-index --no-deps --no-compile .whl/*.whl &&
    python3 -m pip install -q --no-deps --no-build-isolation -e . &&
    python3 benchmarks/scaling.py --json $OUT/scaling.json

Internally each arm is this script again with ``--run <arm>`` in a fresh process (Lightning's
launcher re-runs that command once per extra GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from harness import global_losses  # benchmarks/ is the script's directory

ARMS = {  # name -> (GPUs, strategy overrides)
    "single": (1, ["strategy=auto"]),
    "ddp": (2, ["strategy=ddp"]),
    # the captured step's all-reduce inside the graph (needs accumulation 1 per rank), and DDP's
    # own overlapped bucketed all-reduce with the eager step
    "ddp_allreduce_in_graph": (2, ["strategy=ddp", "module.cuda_graph_allreduce=inside"]),
    "ddp_eager": (2, ["strategy=ddp", "module.cuda_graph=off"]),
    "fsdp": (2, ["strategy=fsdp"]),
    "fsdp_sharded_ac": (2, ["strategy=fsdp", "module.activation_checkpointing=all"]),
    "fsdp2": (2, ["strategy=fsdp2"]),  # fully_shard, context-parallel size 1
    "deepspeed_zero1": (2, ["strategy=deepspeed_zero1"]),
    "deepspeed_zero2": (2, ["strategy=deepspeed_zero2"]),
    "deepspeed_zero3": (2, ["strategy=deepspeed_zero3"]),
}


def overrides(args, arm: str, out: Path) -> list[str]:
    gpus, strategy = ARMS[arm]
    # The default corpus makes 6-micro-batch epochs, and Lightning steps the optimizer at every
    # epoch end: without this, each "131072-token" step held 48 sequences (98304 tokens) on 1 and
    # 2 GPUs alike. One epoch of a whole number of optimizer steps keeps the global batch.
    accum = max(1, args.global_batch_tokens // (args.micro_batch * args.seq_len * gpus))
    return [f"recipe={args.model}", "data=default", "model.vocab_size=4096", "backend=fused",
            "precision=bf16-mixed", "trainer.accelerator=gpu", f"trainer.devices={gpus}",
            *strategy, f"data.seq_len={args.seq_len}", f"data.micro_batch_size={args.micro_batch}",
            f"train.global_batch_tokens={args.global_batch_tokens}", f"trainer.max_steps={args.steps}",
            "trainer.limit_val_batches=0", "train.val_every_n_steps=1000000",
            "callbacks.model_checkpoint=null", "callbacks.progress_bar=null", "logger=csv",
            # StepTimer's peak memory: the throughput monitor resets the peak stats of rank 0 at
            # every logged step (the first 2xH200 run read 4.9 GiB for mamba-370m on 1 GPU)
            "callbacks.throughput=null",
            "trainer.log_every_n_steps=1", "trainer.enable_model_summary=false",
            f"++data.epoch_batches={accum * (args.steps + 1)}",
            f"run_name={arm}", f"paths.output_dir={out}", *args.override]


# ------------------------------------------------------------------------------ one arm
def run_arm(args) -> int:
    import lightning as L
    import torch
    from hydra import compose, initialize_config_module

    from mamba_train.train import train

    class StepTimer(L.Callback):
        """Synchronized timestamp at every optimizer step (rank 0 writes them out)."""

        def __init__(self):
            self.stamps: list[float] = []
            self.batches: list[int] = []  # rank 0's micro-batches run up to each stamp
            self._step = -1
            self._n = 0

        def on_train_start(self, trainer, pl_module):
            self._step = trainer.global_step  # first stamp: end of the first optimizer step

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self._n += 1
            if trainer.global_step != self._step:
                self._step = trainer.global_step
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                self.stamps.append(time.perf_counter())
                self.batches.append(self._n)

        def on_train_end(self, trainer, pl_module):
            peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
            peaks = trainer.strategy.all_gather(torch.tensor(peak, device=pl_module.device))
            if trainer.is_global_zero:
                Path(args.out, f"{args.run}.timing.json").write_text(json.dumps({
                    "stamps": self.stamps, "batches": self.batches, "world_size": trainer.world_size,
                    "accumulation": trainer.accumulate_grad_batches,
                    "peak_mem_gib": [round(float(p), 2) for p in peaks.flatten()],
                    "strategy": type(trainer.strategy).__name__}))

    with initialize_config_module(config_module="mamba_train.conf", version_base="1.3"):
        cfg = compose("config", overrides=overrides(args, args.run, Path(args.out)))
    train(cfg, extra_callbacks=[StepTimer()])
    return 0


# ------------------------------------------------------------------------------ orchestration
def summarize(args, arm: str, out: Path) -> dict:
    timing = json.loads((out / f"{arm}.timing.json").read_text())
    stamps = timing["stamps"][args.warmup:]
    steps = len(stamps) - 1
    # tokens actually trained in the timed window (micro-batches x tokens x ranks), not the
    # configured global batch: an epoch end inside an accumulation window makes a short step
    batches = timing["batches"][args.warmup:]
    tokens = (batches[-1] - batches[0]) * args.micro_batch * args.seq_len * timing["world_size"] if steps > 0 else 0
    if steps > 0 and tokens != args.global_batch_tokens * steps:
        print(f"   WARNING {arm}: {tokens / steps:.0f} tokens per optimizer step, "
              f"not {args.global_batch_tokens}", flush=True)
    tok_s = tokens / (stamps[-1] - stamps[0]) if steps > 0 else float("nan")
    return {"arm": arm, "gpus": timing["world_size"], "strategy": timing["strategy"],
            "accumulation": timing["accumulation"], "timed_steps": steps,
            "tokens_per_step": tokens / steps if steps > 0 else None,
            "tokens_per_s": tok_s, "tokens_per_s_per_gpu": tok_s / timing["world_size"],
            "step_s": (stamps[-1] - stamps[0]) / steps if steps > 0 else None,
            "peak_mem_gib": timing["peak_mem_gib"], "losses": global_losses(out / arm),
            "training_step": training_step_mode(out / arm)}


def training_step_mode(run_dir: Path) -> str | None:
    """Captured in a CUDA graph or eager, and why (the run summary records it)."""
    path = run_dir / "summary.json"
    return json.loads(path.read_text()).get("training_step") if path.is_file() else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mamba-370m", help="a recipe name (default mamba-370m)")
    ap.add_argument("--strategies", nargs="+", default=["ddp", "fsdp"],
                    choices=[a for a in ARMS if a != "single"])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=8, help="optimizer steps left out of the timing")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--global-batch-tokens", type=int, default=131072,
                    help="tokens per optimizer step (1 GPU: accumulation 8 at 8 x 2048)")
    ap.add_argument("--override", action="append", default=[], help="extra Hydra override for every arm")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--run", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.run:
        return run_arm(args)

    import torch
    if torch.cuda.device_count() < 2:
        print(f"needs 2 GPUs, found {torch.cuda.device_count()}", file=sys.stderr)
        return 2
    out = Path(args.out or tempfile.mkdtemp(prefix="mamba_scaling_"))
    arms = ["single", *args.strategies]
    results, failed = [], {}
    for arm in arms:
        if arm.startswith("deepspeed"):
            try:
                import deepspeed  # noqa: F401
            except ImportError as e:
                failed[arm] = f"deepspeed not importable: {e}"
                print(f"== {arm}: skipped ({failed[arm]})", flush=True)
                continue
        cmd = [sys.executable, os.path.abspath(__file__), "--run", arm, "--out", str(out),
               "--model", args.model, "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--seq-len", str(args.seq_len), "--micro-batch", str(args.micro_batch),
               "--global-batch-tokens", str(args.global_batch_tokens),
               *[f"--override={o}" for o in args.override]]
        print(f"== {arm}: {' '.join(cmd[2:])}", flush=True)
        t0 = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        (out / f"{arm}.log").write_text(proc.stdout + "\n" + proc.stderr)
        if proc.returncode != 0 or not (out / f"{arm}.timing.json").is_file():
            failed[arm] = f"exit {proc.returncode}: " + (proc.stderr.strip().splitlines() or ["?"])[-1][-300:]
            print(f"   FAILED ({failed[arm]}); log {out / (arm + '.log')}", flush=True)
            print(proc.stderr[-3000:], flush=True)
            continue
        results.append(summarize(args, arm, out))
        print(f"   done in {time.time() - t0:.0f} s", flush=True)

    base = next((r for r in results if r["arm"] == "single"), None)
    print(f"\nSCALING {args.model}: seq {args.seq_len}, micro-batch {args.micro_batch}, "
          f"{args.global_batch_tokens} tokens/step, {args.steps} steps ({args.warmup} warm-up), bf16-mixed, fused")
    print(f"{'arm':<18}{'GPUs':>5}{'accum':>6}{'tok/s':>11}{'tok/s/GPU':>11}{'eff.':>7}"
          f"{'step s':>8}{'peak GiB':>10}{'max|Δloss|':>12}{'last Δloss':>12}")
    for r in results:
        eff = r["tokens_per_s_per_gpu"] / base["tokens_per_s"] if base else float("nan")
        r["scaling_efficiency"] = eff
        common = sorted(set(r["losses"]) & set(base["losses"])) if base else []
        diffs = [abs(r["losses"][s] - base["losses"][s]) for s in common]
        r["max_abs_loss_diff"] = max(diffs) if diffs else None
        r["last_loss_diff"] = (r["losses"][common[-1]] - base["losses"][common[-1]]) if common else None
        print(f"{r['arm']:<18}{r['gpus']:>5}{r['accumulation']:>6}{r['tokens_per_s']:>11,.0f}"
              f"{r['tokens_per_s_per_gpu']:>11,.0f}{eff:>7.2f}{r['step_s'] or float('nan'):>8.2f}"
              f"{max(r['peak_mem_gib']):>10.1f}"
              f"{(r['max_abs_loss_diff'] if r['max_abs_loss_diff'] is not None else float('nan')):>12.2e}"
              f"{(r['last_loss_diff'] if r['last_loss_diff'] is not None else float('nan')):>12.2e}")
    for r in results:
        print(f"{r['arm']:<18} training step: {r['training_step']}")
    for arm, why in failed.items():
        print(f"{arm:<18} FAILED: {why}")
    if base:
        print("loss (1 GPU): " + ", ".join(f"{s}:{v:.4f}" for s, v in sorted(base["losses"].items())[::5]))
    if args.json:
        args.json.write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "json"},
                                         "results": results, "failed": failed}, indent=2, default=str))
    return 1 if failed and not results else 0


if __name__ == "__main__":
    sys.exit(main())
