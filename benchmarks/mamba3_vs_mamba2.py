"""Learning check: a Mamba-3 and a Mamba-2 of the same 180M shape trained on the same real text.

The text is the Python standard library's own sources on the machine (``*.py`` under the
directory of ``os.py``, site-/dist-packages left out), one document per file, prepared once with
the bundled 4096-token BPE through the prepare CLI (``python -m mamba_train.data.prepare``).
Both models are 37 x 768 (``recipe=mamba3-180m``; the Mamba-2 is ``recipe=mamba2-130m`` at the
same depth: both ~3.8M parameters per layer), trained through ``mamba_train.train.train`` on the
fused backend with the same data order, micro-batch (8 x 2048), schedule (10% warm-up, cosine)
and seed; each at its recipe's peak LR (``--lr`` sets one for all arms). Prints the loss
curves side by side (with the grad norm) and the mean of the last 20 steps; ``--json`` writes
the curves (for benchmarks/RESULTS.md).

    python benchmarks/mamba3_vs_mamba2.py --steps 250 --json out.json     # ~3-4 min on an H200
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ARMS = {"mamba3": "mamba3-180m", "mamba2": "mamba2-130m"}


def parse_arm(spec: str) -> tuple[str, str, list[str]]:
    """``name=recipe[:override,override...]`` (or just a name of ARMS) -> (name, recipe, overrides)."""
    name, _, rest = spec.partition("=")
    if not rest:
        if name not in ARMS:
            raise SystemExit(f"--arm {spec!r}: give name=recipe[:overrides] or one of {list(ARMS)}")
        return name, ARMS[name], []
    recipe, _, overrides = rest.partition(":")
    return name, recipe, [o for o in overrides.split(",") if o]


def stdlib_corpus(dst: Path, max_mb: float) -> int:
    """Copy the standard library's .py files as .txt documents (prepare reads .txt files)."""
    root = Path(os.__file__).parent
    dst.mkdir(parents=True, exist_ok=True)
    total = 0
    for i, src in enumerate(sorted(root.rglob("*.py"))):
        if any(part in ("site-packages", "dist-packages") for part in src.parts):
            continue
        size = src.stat().st_size
        if total + size > max_mb * 1e6:
            break
        shutil.copyfile(src, dst / f"{i:06d}.txt")
        total += size
    return total


def prepare(text_dir: Path, out: Path) -> None:
    cmd = [sys.executable, "-m", "mamba_train.data.prepare", f"source={text_dir}", f"out={out}",
           "tokenizer=default", "num_proc=8", "val_fraction=0.02"]
    subprocess.run(cmd, check=True)


def train_arm(name: str, recipe: str, data: Path, runs: Path, steps: int, micro_batch: int,
              seq_len: int, lr: float | None, n_layer: int, extra: list[str] = (),
              d_model: int = 768) -> dict:
    from hydra import compose, initialize_config_module

    from mamba_train.train import train

    overrides = [
        f"recipe={recipe}", f"data.path={data}", "data.tokenizer=null", "data.num_workers=2",
        "model.vocab_size=4096", f"model.n_layer={n_layer}", f"model.d_model={d_model}",
        f"data.seq_len={seq_len}", f"data.micro_batch_size={micro_batch}",
        f"train.global_batch_tokens={micro_batch * seq_len}", f"trainer.max_steps={steps}",
        *([f"optim.lr={lr}"] if lr is not None else []),
        "trainer.log_every_n_steps=1", "trainer.limit_val_batches=8",
        f"train.val_every_n_steps={steps // 2}", f"train.checkpoint_every_n_steps={steps}",
        "logger=csv", f"paths.output_dir={runs}", f"run_name={name}-learn", "seed=0", *extra,
    ]
    with initialize_config_module(config_module="mamba_train.conf", version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    t0 = time.perf_counter()
    result = train(cfg)
    wall = time.perf_counter() - t0
    run_dir = Path(result["run_dir"])
    train_loss, val_loss, grad_norm = {}, {}, {}
    with open(run_dir / "metrics" / "metrics.csv") as f:
        for row in csv.DictReader(f):
            if row.get("train/loss"):
                train_loss[int(row["step"])] = float(row["train/loss"])
            if row.get("train/grad_norm"):
                grad_norm[int(row["step"])] = float(row["train/grad_norm"])
            if row.get("val/loss"):
                val_loss[int(row["step"])] = float(row["val/loss"])
    n_params = sum(p.numel() for p in {id(p): p for p in result["module"].model.parameters()}.values()) \
        if "module" in result else None
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"recipe": recipe, "overrides": list(extra), "train_loss": train_loss,
            "val_loss": val_loss, "grad_norm": grad_norm, "wall_s": wall, "params": n_params}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--lr", type=float, default=None, help="peak LR of every arm (default: each recipe's)")
    ap.add_argument("--n-layer", type=int, default=37)
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--corpus-mb", type=float, default=40.0)
    ap.add_argument("--arm", action="append", default=None, metavar="NAME=RECIPE[:OVERRIDES]",
                    help="an arm: a name of ARMS, or name=recipe with comma-separated Hydra "
                         "overrides after a colon (repeat; default: mamba3 and mamba2)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--allow-cpu", action="store_true",
                    help="run without a GPU (reference backend): only to smoke-test this script "
                         "with tiny sizes, e.g. --n-layer 1 --seq-len 64 --micro-batch 1 --steps 2")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() and not args.allow_cpu:
        print("needs a CUDA GPU (the reference backend would take hours at this size)", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = True
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    results = {"device": device, "date": time.strftime("%Y-%m-%d"),
               "steps": args.steps, "micro_batch": args.micro_batch, "seq_len": args.seq_len,
               "lr": args.lr, "arms": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        size = stdlib_corpus(tmp / "text", args.corpus_mb)
        prepare(tmp / "text", tmp / "data")
        results["corpus_mb"] = size / 1e6
        print(f"CORPUS {size / 1e6:.1f} MB of stdlib sources prepared in "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
        for name, recipe, extra in map(parse_arm, args.arm or list(ARMS)):
            r = train_arm(name, recipe, tmp / "data", tmp / "runs", args.steps, args.micro_batch,
                          args.seq_len, args.lr, args.n_layer, extra, args.d_model)
            results["arms"][name] = r
            print(f"ARM {name}: {r['params'] or 0:,} parameters, {r['wall_s']:.0f} s", flush=True)
    arms = list(results["arms"])
    steps = sorted(set().union(*(results["arms"][a]["train_loss"] for a in arms)))
    print("LOSS step " + " ".join(f"{a:>12}" for a in arms) + "   (grad norm before clipping)")
    for s in steps:
        if s % 10 == 0 or s == steps[-1]:
            print(f"LOSS {s:4d} " + " ".join(
                f"{results['arms'][a]['train_loss'].get(s, float('nan')):6.3f} "
                f"{results['arms'][a]['grad_norm'].get(s, float('nan')):5.2f}" for a in arms))
    for a in arms:
        tl = results["arms"][a]["train_loss"]
        last = [tl[s] for s in sorted(tl)[-20:]]
        vl = results["arms"][a]["val_loss"]
        print(f"FINAL {a}: mean train loss of the last 20 steps {sum(last) / len(last):.4f}, "
              f"val loss {vl[max(vl)]:.4f} at step {max(vl)}" if vl else
              f"FINAL {a}: mean train loss of the last 20 steps {sum(last) / len(last):.4f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
