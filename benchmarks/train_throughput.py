"""Training throughput: mamba_train's real path vs a plain loop around mamba_ssm, same process.

For each model it measures, on one GPU, with the same micro-batch, precision, optimizer and
clipping:
  (a) a plain PyTorch loop around ``mamba_ssm.MambaLMHeadModel`` (bf16 autocast, fp32 params,
      fused AdamW over the same decay groups, clip 1.0, loss on an fp32 copy of the logits --
      the common way such loops are written);
  (b) ``mamba_train.train.train``: LightningModule + Trainer + the configured callbacks and CSV
      logger + the real loader over prepared token shards (synthetic tokens, 50277 vocab).
Steady-state tokens/s = median over timed windows after warm-up; peak GPU memory per arm; MFU
per arm (model FLOPs from ``mamba_train.models.flops``: 6N plus the scan, see its docstring,
over the bf16 peak of the GPU from Lightning's table).

Prints per model and micro-batch a THROUGHPUT line with the same-batch ratio b/a, a BEST line
with each arm's best micro-batch over ``--micro-batches`` (a larger batch is not the same-batch
ratio), and with ``--ablate-graph`` a GRAPH line: (b) vs (b) with ``module.cuda_graph=off``, the
measured gain of the captured step. ``--fla-peer`` adds a PEER line: the same model through
flash-linear-attention's ``fla.models`` in the plain loop, ours/fla beside ours/plain;
``--ssd-kernel-fla`` an SSD line: (b) with ``kernels.ssd=fla`` vs the default
(Mamba-2 models; both in ``fla_arms.py``). ``--hf-peer`` adds a PEER line for transformers' own
class of the model (``NemotronHForCausalLM``, ``Mamba2ForCausalLM``...) in the same plain loop,
``--moe-arms`` MOE lines for a mixture-of-experts model: the grouped experts against the
per-expert loop, captured and eager, MFU on active FLOPs (both in ``hf_peer.py``). Models that
``MambaLMHeadModel`` cannot build (layer patterns: the hybrids) get no arm (a); their ratio is
against transformers. ``--json`` writes everything.

    python benchmarks/train_throughput.py --models mamba-130m mamba2-130m --micro-batches 8 16

Mamba-3 recipes (``--models mamba3-180m mamba3-440m``) get arm (a) from ``mamba3_plain.py``
(mamba_ssm 2.3.2's ``MambaLMHeadModel`` has no Mamba-3 blocks). Every arm also reports its first
step's time (Triton compile and autotune, and the graph capture for (b)).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/harness.py, fla_arms.py

from harness import (SEQ_LEN, _fmt_arm, framework, mfu, model_config, peak_bf16_flops,  # noqa: E402
                     plain_loop, plain_problem, ready_cuda, synthetic_shards)

def fla_lines(args, name: str, same_mb: dict, entry: dict, timing, data, runs, add_mfu) -> None:
    """The fla peer arm (PEER line) and the fla SSD kernel arm (SSD line), where asked for."""
    from fla_arms import fla_peer_loop, ssd_kernel_arm

    mb, ours, plain = args.micro_batches[0], same_mb["mamba_train"], same_mb["plain"]
    if args.fla_peer:
        c = fla_peer_loop(name, mb, *timing)
        add_mfu(c)
        entry["fla_peer"] = c
        print(f"PEER {name} mb={mb}: fla {_fmt_arm(c)} | mamba_train {_fmt_arm(ours)} | ours/fla "
              f"{ours['tok_s'] / c['tok_s']:.2f} | ours/plain {ours['tok_s'] / plain['tok_s']:.2f}",
              flush=True)
    if args.ssd_kernel_fla and model_config(name)[0].layer == "Mamba2":
        from mamba_train.models.ssd_fla import fla_stack_problem
        if fla_stack_problem():
            print(f"SSD {name} mb={mb}: kernels.ssd=fla not run: {fla_stack_problem()}", flush=True)
            return
        c = ssd_kernel_arm(name, mb, timing, data, runs, args.override)
        add_mfu(c)
        entry["ssd_kernel_fla"] = c
        print(f"SSD {name} mb={mb}: kernels.ssd=fla {_fmt_arm(c)} | kernels.ssd=mamba_ssm "
              f"{_fmt_arm(ours)} | fla/mamba_ssm {c['tok_s'] / ours['tok_s']:.2f}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["mamba-130m", "mamba-370m", "mamba2-130m", "mamba2-370m"])
    ap.add_argument("--micro-batches", nargs="+", type=int, default=[8],
                    help="the first is the same-batch comparison; all are searched for each arm's best")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--windows", type=int, default=3)
    ap.add_argument("--window", type=int, default=8)
    ap.add_argument("--ablate-graph", action="store_true",
                    help="also run (b) with module.cuda_graph=off at the first micro-batch")
    ap.add_argument("--fla-peer", action="store_true",
                    help="also run the same model through fla.models in the plain loop "
                         "(first micro-batch; benchmarks/fla_arms.py)")
    ap.add_argument("--ssd-kernel-fla", action="store_true",
                    help="also run (b) with kernels.ssd=fla for Mamba-2 models")
    ap.add_argument("--hf-peer", action="store_true",
                    help="also run transformers' own class of the model in the plain loop "
                         "(first micro-batch; benchmarks/hf_peer.py)")
    ap.add_argument("--hf-attn", default="sdpa", help="the transformers peer's attn_implementation")
    ap.add_argument("--moe-arms", action="store_true",
                    help="mixture-of-experts models: also mamba_train with model.moe_cfg.impl=loop "
                         "and with the grouped experts eager (MOE lines)")
    ap.add_argument("--peak-flops", type=float, default=None,
                    help="dense bf16 FLOP/s of the GPU for MFU where Lightning's table lacks it "
                         "(e.g. 989e12 for an H200 that reports itself as just 'NVIDIA H200')")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--override", action="append", default=[], help="extra Hydra override for arm (b)")
    args = ap.parse_args(argv)
    if not ready_cuda():
        return 2
    from mamba_train.models.flops import flops_per_token

    peak = peak_bf16_flops(args.peak_flops)
    results = {"device": torch.cuda.get_device_name(), "micro_batches": args.micro_batches,
               "peak_bf16_flops": peak, "date": time.strftime("%Y-%m-%d"), "models": {}}
    timing = (args.warmup, args.windows, args.window)
    with tempfile.TemporaryDirectory() as tmp:
        data, runs = synthetic_shards(Path(tmp) / "data"), Path(tmp) / "runs"
        for name in args.models:
            fpt = flops_per_token(model_config(name)[0], SEQ_LEN)
            if plain_problem(model_config(name)[0]):
                from hf_peer import without_plain
                results["models"][name] = without_plain(
                    args, name, fpt, timing, data, runs,
                    lambda r: r.update(mfu=mfu(r["tok_s"], fpt, peak)), _fmt_arm)
                continue
            per_mb = {}
            for mb in args.micro_batches:
                a = plain_loop(name, mb, *timing)
                print(f"PLAIN {name} mb={mb}: {_fmt_arm(a)} windows {[round(w) for w in a['windows']]}",
                      flush=True)
                b = framework(name, mb, *timing, data, runs, args.override)
                for r in (a, b):
                    r["mfu"] = mfu(r["tok_s"], fpt, peak)
                per_mb[mb] = {"plain": a, "mamba_train": b, "ratio": b["tok_s"] / a["tok_s"]}
                print(f"THROUGHPUT {name} mb={mb}: plain {_fmt_arm(a)} | mamba_train {_fmt_arm(b)} "
                      f"| ratio b/a {b['tok_s'] / a['tok_s']:.2f}", flush=True)
            entry = {"flops_per_token": fpt, "micro_batches": per_mb}
            best = {arm: max(per_mb, key=lambda mb: per_mb[mb][arm]["tok_s"])
                    for arm in ("plain", "mamba_train")}
            entry["best"] = {arm: {"micro_batch": mb, **per_mb[mb][arm]} for arm, mb in best.items()}
            print(f"BEST {name}: plain mb={best['plain']} {_fmt_arm(per_mb[best['plain']]['plain'])} | "
                  f"mamba_train mb={best['mamba_train']} "
                  f"{_fmt_arm(per_mb[best['mamba_train']]['mamba_train'])}", flush=True)
            if args.ablate_graph:
                mb = args.micro_batches[0]
                c = framework(name, mb, *timing, data, runs,
                              [*args.override, "module.cuda_graph=off"], tag="-eager")
                c["mfu"] = mfu(c["tok_s"], fpt, peak)
                b = per_mb[mb]["mamba_train"]
                entry["eager_step"] = c
                print(f"GRAPH {name} mb={mb}: cuda_graph=auto {_fmt_arm(b)} | cuda_graph=off "
                      f"{_fmt_arm(c)} | gain {b['tok_s'] / c['tok_s']:.2f}", flush=True)
            fla_lines(args, name, per_mb[args.micro_batches[0]], entry, timing, data, runs,
                      lambda r: r.update(mfu=mfu(r["tok_s"], fpt, peak)))
            if args.hf_peer:
                from hf_peer import hf_peer_arm
                hf_peer_arm(args, name, per_mb[args.micro_batches[0]]["mamba_train"], entry,
                            timing, lambda r: r.update(mfu=mfu(r["tok_s"], fpt, peak)), _fmt_arm)
            results["models"][name] = entry
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
