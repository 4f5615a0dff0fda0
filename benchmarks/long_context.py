"""Long-context training throughput on one GPU: Mamba, Mamba-2, Transformer++ and Mamba-3,
seq_len 2k-64k at a constant number of tokens per micro-batch.

Every measurement is a real ``mamba_train.train.train`` run (Lightning module, the captured CUDA
graph step where it applies, the chunked loss, the token-shard loader over synthetic tokens,
bf16-mixed with fp32 parameters and fused AdamW), with micro-batch = ``--tokens`` / seq_len so
each step trains the same number of tokens. For each run: training tok/s over ``--steps`` timed
steps after ``--warmup`` (which covers the eager steps before the graph capture), MFU from
``mamba_train.models.flops`` (attention counted with its quadratic ``4 * T * d_attn`` term, dense,
PaLM's convention), peak allocated memory, how the step ran (captured or eager, and why).

Activation checkpointing is off first; a run that runs out of memory is recorded (OOM line) and
retried with ``module.activation_checkpointing=all``. Extra runs measure checkpointing where it
is not needed (its cost, and whether the step is still captured) and probe the longest sequence
Mamba-2 trains at micro-batch 1. Runs are ordered so the most important numbers come first, and
a time guard stops starting (and stops a running) measurement at ``--budget-s``, then writes
what it has: one raw ``LONGCTX`` line per measurement on stdout, ``long_context.json`` and
``long_context.png`` (tok/s against seq_len, log2 axis) under ``--out``.

    python benchmarks/long_context.py --out /tmp/lc --budget-s 330
    python benchmarks/long_context.py --plot-only /tmp/lc/long_context.json   # redraw the PNG
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import sys
import tempfile
import threading
import time
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/harness.py
import harness  # noqa: E402

VOCAB = 50277
SEQ_LENS = [2048, 4096, 8192, 16384, 32768, 65536]
BASE = ["recipe=mamba2-370m"]  # optimizer, precision, data settings shared by every arm
ARMS = {  # name -> Hydra overrides selecting the model (same width 1024)
    "mamba2-370m": ["model=mamba2-370m"],
    "transformerpp-370m": ["model=transformerpp-370m"],
    "mamba-370m": ["model=mamba-370m"],
    "mamba3-370m": ["model=mamba2-370m", "model.ssm_cfg.layer=Mamba3"],  # 48 x 1024, defaults
    "hybrid-370m": ["model=hybrid-370m"],  # Nemotron-H-style: Mamba-2 + ~8% attention, same width
}
SSMS = ("mamba2-370m", "mamba-370m", "mamba3-370m", "hybrid-370m")
BASELINE = "transformerpp-370m"


def plan(arms: list[str], seq_lens: list[int], probe: list[int]) -> list[tuple[str, int, str]]:
    """(arm, seq_len, policy) in priority order: the targets' numbers first (Mamba-2 at 2k, 32k,
    64k and the baseline there), then the rest of the grid, then checkpointing controls, the
    longest-sequence probe and Mamba-3 (newest, least known compile time)."""
    first = [s for s in (2048, 32768, 65536) if s in seq_lens]
    middle = [s for s in (8192, 4096, 16384) if s in seq_lens]
    rest = [s for s in seq_lens if s not in first + middle]
    order = []
    core = [a for a in ("mamba2-370m", BASELINE) if a in arms]
    order += [(a, s, "off") for s in first for a in core]
    if "mamba-370m" in arms:
        order += [("mamba-370m", s, "off") for s in first]
    order += [(a, s, "off") for s in middle + rest for a in core + [x for x in ["mamba-370m"] if x in arms]]
    if "mamba2-370m" in arms and seq_lens:
        order.append(("mamba2-370m", max(seq_lens), "all"))  # checkpointing's cost, and capture
        order += [("mamba2-370m", s, "off") for s in probe]
    for late in ("hybrid-370m", "mamba3-370m"):
        if late in arms:
            order += [(late, s, "off") for s in first + middle + rest]
    return order


def synthetic_shards(root: Path, train_tokens: int = 8_000_000, val_tokens: int = 600_000,
                     doc_len: int = 0) -> Path:
    """``harness.synthetic_shards`` at this benchmark's sizes (val holds one 256k window).
    With ``doc_len`` the tokens form packed documents: an EOS (id 0) ends each document, whose
    lengths are drawn uniformly from [doc_len / 2, 3 doc_len / 2]."""
    if not doc_len:
        return harness.synthetic_shards(root, train_tokens, val_tokens, vocab=VOCAB)
    import numpy as np

    from mamba_train.data.shards import write_tokens
    rng = np.random.default_rng(0)
    tok = {"name": "synthetic", "vocab_size": VOCAB, "eos_id": 0}
    for split, n in (("train", train_tokens), ("val", val_tokens)):
        tokens = rng.integers(1, VOCAB, n, dtype=np.uint16)
        ends = np.cumsum(rng.integers(doc_len // 2, 3 * doc_len // 2 + 1, n // (doc_len // 2) + 1))
        tokens[ends[ends < n]] = 0
        write_tokens(root / split, tokens, tok, split=split)
    return root


def peak_bf16_flops(override: float | None) -> float:
    """``harness.peak_bf16_flops``, else the H100/H200 dense bf16 peak (989e12)."""
    try:
        return harness.peak_bf16_flops(override) or 989e12
    except Exception:  # noqa: BLE001 -- no table entry for this device: the H100/H200 figure
        return 989e12


class StepClock(L.Callback):
    """Synchronised stamps after optimizer steps ``warmup`` and ``warmup + steps``; the peak
    memory; a time guard that ends the run at ``deadline`` (then the run is marked partial)."""

    def __init__(self, warmup: int, steps: int, deadline: float):
        self.warmup, self.steps, self.deadline = warmup, steps, deadline
        self.stamps: dict[int, float] = {}
        self.stopped_by_guard = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step in (self.warmup, self.warmup + self.steps):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.stamps[step] = time.perf_counter()
        if time.time() > self.deadline and not trainer.should_stop:
            self.stopped_by_guard = True
            trainer.should_stop = True

    def tok_s(self, tokens_per_step: int) -> float | None:
        a, b = self.stamps.get(self.warmup), self.stamps.get(self.warmup + self.steps)
        return tokens_per_step * self.steps / (b - a) if a is not None and b is not None else None


def _train_once(arm: str, seq_len: int, micro_batch: int, policy: str, args, data: Path,
                runs: Path, clock: StepClock) -> dict:
    from hydra import compose, initialize_config_module

    from mamba_train.train import train

    tokens = micro_batch * seq_len
    overrides = [
        *BASE, *ARMS[arm], *(args.ssm_override if arm in SSMS else []),
        *(["data.document_boundaries=true"] if args.doc_len else []),
        f"data.path={data}", "data.tokenizer=null", "data.num_workers=0",
        f"data.seq_len={seq_len}", f"data.micro_batch_size={micro_batch}",
        f"train.global_batch_tokens={tokens}", f"trainer.max_steps={args.warmup + args.steps}",
        "trainer.limit_val_batches=0", "train.val_every_n_steps=100000",
        "train.checkpoint_every_n_steps=100000", "callbacks.model_checkpoint.save_last=false",
        "callbacks.progress_bar=null", "trainer.enable_model_summary=false", "logger=csv",
        "callbacks.ssm_health.every_n_steps=0", f"module.activation_checkpointing={policy}",
        f"paths.output_dir={runs}", f"run_name={arm}-{seq_len}-{policy}",
    ]
    with initialize_config_module(config_module="mamba_train.conf", version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    result = train(cfg, extra_callbacks=[clock])
    return {"step_mode": getattr(result["module"], "training_step_mode", "?"),
            "steps_done": int(result["trainer"].global_step)}


def measure(arm: str, seq_len: int, policy: str, args, data: Path, runs: Path, deadline: float,
            flops: dict, peak: float | None) -> dict:
    micro_batch = max(1, args.tokens // seq_len)
    row = {"arm": arm, "seq_len": seq_len, "micro_batch": micro_batch,
           "tokens_per_step": micro_batch * seq_len, "activation_checkpointing": policy}
    clock = StepClock(args.warmup, args.steps, deadline)
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    try:
        row.update(_train_once(arm, seq_len, micro_batch, policy, args, data, runs, clock))
        row["status"] = "ok"
    except Exception as e:  # noqa: BLE001 -- record any failure and continue with the next run
        msg = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        oom = isinstance(e, torch.OutOfMemoryError) or "out of memory" in msg.lower()
        row["status"], row["error"] = ("oom" if oom else "error"), msg
        del e
    row["wall_s"] = round(time.perf_counter() - start, 1)
    row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    row["tok_s"] = clock.tok_s(row["tokens_per_step"]) if row["status"] == "ok" else None
    if row["status"] == "ok" and row["tok_s"] is None:
        row["status"] = "partial (time guard)" if clock.stopped_by_guard else "partial"
    if row["tok_s"] is not None:
        fpt = flops.get((arm, seq_len))
        row["flops_per_token"] = fpt
        row["mfu"] = harness.mfu(row["tok_s"], fpt, peak) if fpt else None
    gc.collect()
    torch.cuda.empty_cache()
    return row


def _flops(arm: str, seq_len: int) -> int | None:
    from hydra import compose, initialize_config_module
    from hydra.utils import instantiate

    from mamba_train.models.flops import flops_per_token
    try:
        with initialize_config_module(config_module="mamba_train.conf", version_base="1.3"):
            cfg = compose("config", overrides=[*BASE, *ARMS[arm]])
        return flops_per_token(instantiate(cfg.model, _convert_="all"), seq_len)
    except Exception:  # noqa: BLE001 -- no FLOP count for this arm: no MFU, the rest stands
        return None


def line(row: dict) -> str:
    tok = f"{row['tok_s']:,.0f} tok/s" if row.get("tok_s") else "- tok/s"
    mfu = f"MFU {row['mfu']:.1%}" if row.get("mfu") is not None else "MFU -"
    extra = row.get("error") or row.get("step_mode", "")
    return (f"LONGCTX {row['arm']} seq_len={row['seq_len']} mb={row['micro_batch']} "
            f"ac={row['activation_checkpointing']} status={row['status']} {tok} {mfu} "
            f"peak {row['peak_mem_gib']:.1f} GiB wall {row['wall_s']:.0f}s | {extra}")


def best(rows: list[dict], arm: str) -> dict[int, dict]:
    """Per seq_len the arm's grid measurement that trained (checkpointing off, else on)."""
    out: dict[int, dict] = {}
    for r in rows:
        if r["arm"] == arm and r.get("tok_s"):
            if r["seq_len"] not in out or out[r["seq_len"]]["activation_checkpointing"] != "off":
                out[r["seq_len"]] = r
    return out


def crossover(rows: list[dict], ssm: str) -> dict | None:
    """Smallest measured seq_len where ``ssm`` trains more tok/s than the baseline, and the
    log2-interpolated length where the tok/s ratio crosses 1 between neighbouring points."""
    a, b = best(rows, ssm), best(rows, BASELINE)
    common = sorted(set(a) & set(b))
    if not common:
        return None
    ratios = {s: a[s]["tok_s"] / b[s]["tok_s"] for s in common}
    wins = [s for s in common if ratios[s] > 1]
    out = {"ratios": ratios, "first_win": wins[0] if wins else None}
    if wins and wins[0] != common[0]:
        lo = common[common.index(wins[0]) - 1]
        hi = wins[0]
        x0, x1, y0, y1 = math.log2(lo), math.log2(hi), math.log(ratios[lo]), math.log(ratios[hi])
        out["interpolated"] = round(2 ** (x0 + (0 - y0) * (x1 - x0) / (y1 - y0)))
    elif wins:
        out["interpolated"] = f"<= {common[0]} (wins at every measured length)"
    return out


def summarize(rows: list[dict]) -> dict:
    summary = {"crossover_vs_" + BASELINE: {s: crossover(rows, s) for s in SSMS}}
    m2 = best(rows, "mamba2-370m")
    if 2048 in m2 and 32768 in m2:
        summary["mamba2_32k_over_2k"] = m2[32768]["tok_s"] / m2[2048]["tok_s"]
    fits = [r for r in rows if r["arm"] == "mamba2-370m" and r.get("micro_batch") == 1
            and r.get("tok_s")]
    top = max(fits, key=lambda r: r["seq_len"], default=None)
    summary["mamba2_longest_seq_len_mb1"] = top and {
        k: top[k] for k in ("seq_len", "activation_checkpointing", "peak_mem_gib", "tok_s")}
    return summary


def plot(results: dict, png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    rows = results["rows"]
    for arm in dict.fromkeys(r["arm"] for r in rows):
        pts = best(rows, arm)
        if not pts:
            continue
        xs = sorted(pts)
        ax.plot(xs, [pts[s]["tok_s"] / 1e3 for s in xs], marker="o", label=arm)
        ck = [s for s in xs if pts[s]["activation_checkpointing"] != "off"]
        ax.scatter(ck, [pts[s]["tok_s"] / 1e3 for s in ck], marker="s", s=80, facecolors="none",
                   edgecolors="k")
    ax.set_xscale("log", base=2)
    ax.set_xlabel(f"sequence length (tokens); micro-batch = {results['tokens_per_step']} / seq_len "
                  "(at least 1)")
    ax.set_ylabel("training throughput (k tokens/s)")
    ax.set_title(f"{results['device']}, bf16-mixed, {results['date']} (squares: checkpointed)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def write(results: dict, out: Path) -> None:
    results["summary"] = summarize(results["rows"])
    (out / "long_context.json").write_text(json.dumps(results, indent=2, default=str))
    try:
        plot(results, out / "long_context.png")
    except Exception as e:  # noqa: BLE001 -- the JSON is what matters; --plot-only redraws
        print(f"plot failed: {type(e).__name__}: {e}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("long_context_out"))
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--seq-lens", nargs="+", type=int, default=SEQ_LENS)
    ap.add_argument("--tokens", type=int, default=65536, help="tokens per micro-batch")
    ap.add_argument("--probe", nargs="*", type=int, default=[131072, 262144],
                    help="longer Mamba-2 sequences at micro-batch 1 (checkpointing if needed)")
    ap.add_argument("--warmup", type=int, default=4, help="untimed optimizer steps (the graph step "
                    "runs 3 eager micro-steps, then captures on the 4th)")
    ap.add_argument("--steps", type=int, default=3, help="timed optimizer steps")
    ap.add_argument("--budget-s", type=float, default=330.0,
                    help="stop cleanly after this many seconds (a hard stop writes the results "
                         "20 s later if a run is stuck in a compile)")
    ap.add_argument("--min-run-s", type=float, default=12.0, help="don't start a run with less left")
    ap.add_argument("--peak-flops", type=float, default=None,
                    help="bf16 dense peak FLOP/s for MFU (default: Lightning's table, else 989e12)")
    ap.add_argument("--ssm-override", action="append", default=[],
                    help="extra Hydra override for the SSM arms only (e.g. the SSD kernel choice)")
    ap.add_argument("--doc-len", type=int, default=0,
                    help="pack documents of about this many tokens and train with "
                         "data.document_boundaries=true (0: one unbroken token stream)")
    ap.add_argument("--plot-only", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.plot_only:
        plot(json.loads(args.plot_only.read_text()), args.plot_only.with_suffix(".png"))
        return 0
    t0 = time.time()
    deadline = t0 + args.budget_s
    if not harness.ready_cuda():
        return 2
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    arms = args.arms
    args.out.mkdir(parents=True, exist_ok=True)
    peak = peak_bf16_flops(args.peak_flops)
    results = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"),
               "torch": torch.__version__, "argv": sys.argv, "tokens_per_step": args.tokens,
               "warmup": args.warmup, "steps": args.steps, "peak_bf16_flops": peak,
               "arms": {a: ARMS[a] for a in arms}, "ssm_override": args.ssm_override, "doc_len": args.doc_len, "rows": []}
    rows = results["rows"]
    lock = threading.Lock()

    def hard_stop():  # a run stuck past the guard (a long compile): write what there is, leave
        with lock:
            print(f"LONGCTX hard stop at {time.time() - t0:.0f}s", flush=True)
            write(results, args.out)
        import os
        os._exit(0)

    timer = threading.Timer(args.budget_s + 20, hard_stop)
    timer.daemon = True
    timer.start()
    flops = {}
    todo = plan(arms, sorted(args.seq_lens), args.probe)
    with tempfile.TemporaryDirectory() as tmp:
        data = synthetic_shards(Path(tmp) / "data", train_tokens=8_000_000, val_tokens=600_000,
                                doc_len=args.doc_len)
        runs = Path(tmp) / "runs"
        for arm, seq_len, policy in todo:
            if deadline - time.time() < args.min_run_s:
                print(f"LONGCTX {arm} seq_len={seq_len} ac={policy} status=skipped (time budget)",
                      flush=True)
                rows.append({"arm": arm, "seq_len": seq_len, "activation_checkpointing": policy,
                             "status": "skipped (time budget)"})
                continue
            if (arm, seq_len) not in flops:
                flops[(arm, seq_len)] = _flops(arm, seq_len)
            # checkpointing off first; on only where off runs out of memory
            for p in [policy] if policy == "all" else ["off", "all"]:
                row = measure(arm, seq_len, p, args, data, runs, deadline, flops, peak)
                with lock:
                    rows.append(row)
                    print(line(row), flush=True)
                    write(results, args.out)
                if row["status"] != "oom" or deadline - time.time() < args.min_run_s:
                    break
    with lock:
        results["total_s"] = round(time.time() - t0, 1)
        write(results, args.out)
        print("LONGCTX summary " + json.dumps(results["summary"], default=str), flush=True)
    import os
    os._exit(0)  # the hard-stop timer thread must not keep the process alive


if __name__ == "__main__":
    sys.exit(main())
