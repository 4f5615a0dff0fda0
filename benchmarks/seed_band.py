"""Seed band: does a change keep the 200-step loss trajectory inside the run-to-run and seed spread?

The project's exactness rule for a change that reorders arithmetic (a kernel, a fused op): it may
move the loss trajectory only within the seed band. This tool measures that band and checks each
arm against it. It trains every arm (a name and Hydra overrides) for every seed through the real
``mamba_train.train.train`` (fused backend, the recipe's optimizer and schedule, the captured
step), on real text, and compares the arms' losses.

Data (``--corpus``): ``stdlib`` (default) the Python standard library's own ``*.py`` sources on
the machine (site-/dist-packages left out), one document per file, ``embedded`` the corpus the
README's quick start trains on (``mamba_train/data/default_corpus.py``: ~113k tokens, so 200 steps
of 8 x 2048 see it ~30 times), or a directory prepared by ``python -m mamba_train.data.prepare``.
The first two are prepared with the bundled 4096-token BPE into ``--work`` (a temporary
directory by default); the model's vocabulary is the prepared data's. ``seed=`` sets the model
initialisation and the data order (``data.seed`` follows ``seed``), so the band covers both, plus
the run-to-run spread of the kernels' atomic accumulations.

Per run one raw line (``arm``, ``seed``, validation loss after the last step, and the train
loss at steps 50/100/200, a quarter, half and all of ``--steps`` -- each the mean of the 10
steps ending there, less noisy than one step's loss -- plus the mean of the last 20 steps):

    SEEDBAND arm=ssd seed=1235 val=3.4974 train@50=4.2101 train@100=3.5012 train@200=2.9410 last20=2.9332 steps=200 wall_s=61.2

then per arm ``SEEDBAND_ARM`` (mean +- sample standard deviation, n) and per other arm
``SEEDBAND_CHECK``: whether its mean of each metric lies inside the baseline arm's band,
mean +- 2 sample standard deviations over the baseline's runs (needs >= 2 baseline runs). Runs go
seed by seed, every arm at each seed, so a ``--budget-s`` stop leaves the arms balanced; the JSON
(``--json``) is rewritten after every run. ``--from-log`` re-summarises the ``SEEDBAND`` lines of
earlier logs (several device calls) without training.

    python benchmarks/seed_band.py --arm base= --arm ssd=kernels.ssd=mamba_train \\
        --seeds 1234 1235 1236 --budget-s 500 --json seed_band.json
    python benchmarks/seed_band.py --from-log call1.log call2.log     # combine earlier runs
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SPAN = 10  # train@N: the mean of the SPAN steps ending at step N
BAND_K = 2.0
RULE = (f"an arm is inside when its mean of every metric lies within the baseline arm's mean "
        f"+- {BAND_K:g} sample standard deviations over the baseline's runs (>= 2 runs)")


# ------------------------------------------------------------------------ pure parts (tested)
def parse_arm(spec: str) -> tuple[str, list[str]]:
    """``name=override override ...`` (whitespace-separated Hydra overrides, taken verbatim;
    ``name=`` is the recipe as it is) -> (name, overrides)."""
    name, sep, rest = spec.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z0-9_-]+", name):  # no '.': catches a bare override
        raise ValueError(f"--arm {spec!r}: give NAME=OVERRIDES (NAME of letters, digits, _ and -; "
                         "OVERRIDES Hydra overrides separated by spaces, may be empty)")
    return name, rest.split()


def step_loss(train_loss: dict[int, float], step: int, span: int = SPAN) -> float:
    """Mean train loss of optimizer steps ``step - span + 1 .. step`` (1-based: step 1 is the
    first optimizer step), nan where none was logged."""
    vals = [train_loss[s] for s in range(step - span + 1, step + 1) if s in train_loss]
    return sum(vals) / len(vals) if vals else math.nan


def check_steps(steps: int) -> tuple[int, ...]:
    """Where the train loss is compared: a quarter, half and all of the run (50/100/200)."""
    return tuple(sorted({max(1, steps // 4), max(1, steps // 2), steps}))


def metric_names(steps: int) -> tuple[str, ...]:
    """The compared metrics of a run of ``steps`` steps (``last20`` is reported, not checked)."""
    return ("val", *(f"train@{s}" for s in check_steps(steps)))


def run_metrics(train_loss: dict[int, float], val_loss: dict[int, float],
                steps: int) -> dict[str, float]:
    """The numbers of one run from its losses keyed by 1-based optimizer step."""
    out = {"val": val_loss[max(val_loss)] if val_loss else math.nan}
    for s in check_steps(steps):
        out[f"train@{s}"] = step_loss(train_loss, s)
    last = [train_loss[s] for s in sorted(train_loss)[-20:]]
    out["last20"] = sum(last) / len(last) if last else math.nan
    return out


def format_run(run: dict) -> str:
    m = run["metrics"]
    return (f"SEEDBAND arm={run['arm']} seed={run['seed']} "
            + " ".join(f"{k}={v:.4f}" for k, v in m.items())
            + f" steps={run['steps']} wall_s={run['wall_s']:.1f}")


_LINE = re.compile(r"^SEEDBAND (arm=\S+ .*)$")


def parse_runs(text: str) -> list[dict]:
    """The runs of ``SEEDBAND`` lines in ``text`` (other lines, and failed runs, ignored)."""
    runs = []
    for line in text.splitlines():
        m = _LINE.match(line.strip())
        if not m:
            continue
        kv = dict(tok.split("=", 1) for tok in m.group(1).split() if "=" in tok)
        if "error" in kv or not all(k in kv for k in ("arm", "seed", "val")):
            continue
        metrics = {k: float(v) for k, v in kv.items()
                   if k in ("val", "last20") or k.startswith("train@")}
        runs.append({"arm": kv["arm"], "seed": int(kv["seed"]),
                     "steps": int(kv.get("steps", 0)), "wall_s": float(kv.get("wall_s", "nan")),
                     "metrics": metrics})
    return runs


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1; None for fewer than two values)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def summarise(runs: list[dict]) -> dict[str, dict]:
    """arm -> {n, seeds, metric: {mean, std}}, arms in first-seen order."""
    arms: dict[str, list[dict]] = {}
    for r in runs:
        arms.setdefault(r["arm"], []).append(r)
    out = {}
    for arm, rs in arms.items():
        entry: dict = {"n": len(rs), "seeds": [r["seed"] for r in rs]}
        keys = list(dict.fromkeys(k for r in rs for k in r["metrics"]))
        for k in keys:
            vals = [r["metrics"][k] for r in rs if not math.isnan(r["metrics"].get(k, math.nan))]
            if vals:
                mean, std = mean_std(vals)
                entry[k] = {"mean": mean, "std": std, "n": len(vals)}
        out[arm] = entry
    return out


def check_arm(base: dict, arm: dict, k: float = BAND_K) -> dict:
    """Per metric, whether ``arm``'s mean lies in ``base``'s mean +- k std, and the verdict:
    ``inside`` (every metric), ``outside`` (any metric) or ``no band`` (fewer than two baseline
    runs for some metric, or a metric missing)."""
    per, verdict = {}, "inside"
    checked = [m for m in (*base, *arm) if m == "val" or m.startswith("train@")]
    for m in dict.fromkeys(checked):
        b, a = base.get(m), arm.get(m)
        if b is None or a is None or b["std"] is None:
            per[m] = {"status": "no band"}
            verdict = "outside" if verdict == "outside" else "no band"
            continue
        lo, hi = b["mean"] - k * b["std"], b["mean"] + k * b["std"]
        inside = lo <= a["mean"] <= hi
        per[m] = {"status": "inside" if inside else "outside", "mean": a["mean"], "lo": lo, "hi": hi}
        if not inside:
            verdict = "outside"
    return {"verdict": verdict, "metrics": per}


def report_lines(runs: list[dict], baseline: str | None) -> tuple[list[str], dict, dict]:
    """SEEDBAND_ARM and SEEDBAND_CHECK lines, the summary and the checks."""
    summary = summarise(runs)
    lines = []
    for arm, s in summary.items():
        parts = []
        for m in s:
            if isinstance(s[m], dict):
                std = "n/a" if s[m]["std"] is None else f"{s[m]['std']:.4f}"
                parts.append(f"{m} {s[m]['mean']:.4f} +- {std}")
        lines.append(f"SEEDBAND_ARM {arm} n={s['n']} seeds={','.join(map(str, s['seeds']))}: "
                     + " | ".join(parts))
    checks = {}
    base = baseline or (next(iter(summary)) if summary else None)
    if base is not None and base not in summary:
        lines.append(f"SEEDBAND_CHECK baseline arm {base!r} has no finished run")
        return lines, summary, checks
    for arm in summary:
        if arm == base:
            continue
        c = check_arm(summary[base], summary[arm])
        checks[arm] = c
        parts = []
        for m, r in c["metrics"].items():
            parts.append(f"{m} {r['mean']:.4f} {r['status']} [{r['lo']:.4f}, {r['hi']:.4f}]"
                         if "lo" in r else f"{m} {r['status']}")
        lines.append(f"SEEDBAND_CHECK {arm} vs {base}: {c['verdict'].upper()} | " + " | ".join(parts))
    if checks:
        lines.append(f"SEEDBAND_RULE {RULE}")
    return lines, summary, checks


# ------------------------------------------------------------------------------ data and runs
def stdlib_corpus(dst: Path, max_mb: float) -> int:
    """The standard library's ``.py`` files copied as ``.txt`` documents (prepare reads .txt)."""
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


def prepared_data(corpus: str, work: Path, max_mb: float) -> Path:
    """A prepared data directory for ``corpus`` (prepared once per ``work`` directory)."""
    if corpus not in ("stdlib", "embedded"):
        path = Path(corpus)
        if not (path / "train").is_dir():
            raise SystemExit(f"--corpus {corpus}: not stdlib, embedded or a prepared directory "
                             "(python -m mamba_train.data.prepare source=... out=DIR)")
        return path
    out = work / f"data-{corpus}"
    if (out / "train").is_dir() and (out / "val").is_dir():
        return out
    if corpus == "stdlib":
        source = work / "stdlib-text"
        size = stdlib_corpus(source, max_mb)
        print(f"SEEDBAND_DATA stdlib: {size / 1e6:.1f} MB of sources", flush=True)
    else:
        source = "default"
    cmd = [sys.executable, "-m", "mamba_train.data.prepare", f"source={source}", f"out={out}",
           "tokenizer=default", f"num_proc={max(1, min(8, (os.cpu_count() or 2) - 1))}",
           "val_fraction=0.02"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return out


def vocab_of(data: Path) -> int:
    from mamba_train.data.shards import read_index
    return int(read_index(data / "train")["tokenizer"]["vocab_size"])


def read_losses(metrics_csv: Path) -> tuple[dict[int, float], dict[int, float]]:
    """train and val loss keyed by optimizer step (the CSV's ``step``: the number of optimizer
    steps taken when the value was logged, so the first step's loss is at 1)."""
    train_loss, val_loss = {}, {}
    with open(metrics_csv) as f:
        for row in csv.DictReader(f):
            if row.get("train/loss"):
                train_loss[int(row["step"])] = float(row["train/loss"])
            if row.get("val/loss"):
                val_loss[int(row["step"])] = float(row["val/loss"])
    return train_loss, val_loss


def train_run(args, arm: str, overrides: list[str], seed: int, data: Path, runs: Path) -> dict:
    from hydra import compose, initialize_config_module

    from mamba_train.train import train

    mb, seq = args.micro_batch, args.seq_len
    base = [
        f"recipe={args.recipe}", f"data.path={data}", "data.tokenizer=null", "data.num_workers=2",
        f"model.vocab_size={vocab_of(data)}", f"data.seq_len={seq}", f"data.micro_batch_size={mb}",
        f"train.global_batch_tokens={mb * seq}", f"trainer.max_steps={args.steps}",
        "trainer.log_every_n_steps=1", f"trainer.limit_val_batches={args.val_batches}",
        f"train.val_every_n_steps={args.steps}", "train.checkpoint_every_n_steps=1000000",
        "callbacks.model_checkpoint.save_last=false", "logger=csv", f"paths.output_dir={runs}",
        f"run_name={arm}-s{seed}", f"seed={seed}",
    ]
    with initialize_config_module(config_module="mamba_train.conf", version_base="1.3"):
        cfg = compose("config", overrides=[*base, *args.override, *overrides])
    t0 = time.perf_counter()
    result = train(cfg)
    wall = time.perf_counter() - t0
    train_loss, val_loss = read_losses(Path(result["run_dir"]) / "metrics" / "metrics.csv")
    return {"arm": arm, "seed": seed, "overrides": overrides, "steps": args.steps, "wall_s": wall,
            "metrics": run_metrics(train_loss, val_loss, args.steps), "train_loss": train_loss,
            "val_loss": val_loss}


def free_gpu() -> None:
    import gc

    import torch
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="mamba2-130m")
    ap.add_argument("--arm", action="append", default=None, metavar="NAME=OVERRIDES",
                    help="an arm: a name and space-separated Hydra overrides, verbatim (repeat; "
                         "the first is the baseline unless --baseline; default: base=)")
    ap.add_argument("--baseline", default=None, help="the arm whose band the others are checked against")
    ap.add_argument("--seeds", nargs="+", type=int, default=[1234, 1235, 1236])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--val-batches", type=int, default=8)
    ap.add_argument("--corpus", default="stdlib", help="stdlib, embedded, or a prepared directory")
    ap.add_argument("--corpus-mb", type=float, default=40.0, help="stdlib: at most this much text")
    ap.add_argument("--work", type=Path, default=None, help="data and run directories (default: temporary)")
    ap.add_argument("--override", action="append", default=[], help="a Hydra override for every arm")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="start no run that would end past this many seconds from the start "
                         "(estimated from the arm's last run, else the longest so far)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--from-log", nargs="+", type=Path, default=None,
                    help="summarise the SEEDBAND lines of these logs instead of training")
    ap.add_argument("--allow-cpu", action="store_true",
                    help="run without a GPU (reference backend): only to smoke-test this script "
                         "with a debug recipe and tiny sizes")
    args = ap.parse_args(argv)
    try:
        arms = [parse_arm(a) for a in (args.arm or ["base="])]
    except ValueError as e:
        print(f"SEEDBAND error: {e}", file=sys.stderr)
        return 2
    names = [a for a, _ in arms]
    if len(set(names)) != len(names):
        print(f"SEEDBAND error: arm names repeat: {names}", file=sys.stderr)
        return 2
    if args.baseline is not None and args.baseline not in names and not args.from_log:
        print(f"SEEDBAND error: --baseline {args.baseline} is not an arm ({names})", file=sys.stderr)
        return 2

    if args.from_log:
        runs = [r for p in args.from_log for r in parse_runs(p.read_text())]
        lines, summary, checks = report_lines(runs, args.baseline)
        print("\n".join(lines) or "SEEDBAND no runs in the logs")
        if args.json:
            args.json.write_text(json.dumps({"runs": runs, "summary": summary, "checks": checks,
                                             "rule": RULE}, indent=2))
        return 0 if runs else 1

    import torch
    if not torch.cuda.is_available() and not args.allow_cpu:
        print("SEEDBAND error: needs a CUDA GPU (--allow-cpu only smoke-tests with a debug recipe)",
              file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = True
    t_start = time.perf_counter()
    results = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
               "date": time.strftime("%Y-%m-%d"), "recipe": args.recipe, "steps": args.steps,
               "micro_batch": args.micro_batch, "seq_len": args.seq_len, "corpus": args.corpus,
               "common_overrides": args.override, "arms": dict(arms), "seeds": args.seeds,
               "rule": RULE, "runs": [], "failed": [], "stopped": None}

    def write() -> None:
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))

    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        data = prepared_data(args.corpus, work, args.corpus_mb)
        print(f"SEEDBAND_DATA {args.corpus}: prepared in {time.perf_counter() - t_start:.0f} s, "
              f"vocabulary {vocab_of(data)}", flush=True)
        last_wall: dict[str, float] = {}
        broken: set[str] = set()
        plan = [(seed, arm, ov) for seed in args.seeds for arm, ov in arms]
        for i, (seed, arm, ov) in enumerate(plan):
            if arm in broken:
                continue
            used = time.perf_counter() - t_start
            guess = last_wall.get(arm, max(last_wall.values(), default=0.0))
            if args.budget_s is not None and used + guess > args.budget_s:
                results["stopped"] = (f"{used:.0f} s used of {args.budget_s:.0f}; the next run "
                                      f"(arm {arm}, seed {seed}) estimated {guess:.0f} s")
                print(f"SEEDBAND budget: stopped before run {i + 1} of {len(plan)} "
                      f"({results['stopped']})", flush=True)
                break
            try:
                run = train_run(args, arm, ov, seed, data, work / "runs")
            except Exception as e:  # one arm's bad override must not lose the others' runs
                msg = f"{type(e).__name__}: {e}".replace("\n", " ")[:300]
                print(f"SEEDBAND arm={arm} seed={seed} error={msg}", flush=True)
                results["failed"].append({"arm": arm, "seed": seed, "error": msg})
                broken.add(arm)
                free_gpu()
                write()
                continue
            last_wall[arm] = run["wall_s"]
            results["runs"].append(run)
            print(format_run(run), flush=True)
            free_gpu()
            write()
    lines, summary, checks = report_lines(results["runs"], args.baseline or names[0])
    print("\n".join(lines), flush=True)
    results.update(summary=summary, checks=checks)
    write()
    return 0 if results["runs"] else 1


if __name__ == "__main__":
    sys.exit(main())
