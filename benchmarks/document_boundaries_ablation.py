"""Ablation: the same debug run with and without document boundaries (state resets at EOS).

Trains the debug recipe twice on the embedded corpus, identical except for
``data.document_boundaries``, and prints the validation loss of each run side by side (each run
is validated the way it trains: with boundaries, the validation windows carry ``seq_idx`` too).

    python benchmarks/document_boundaries_ablation.py [--recipe debug] [--steps 200] [overrides...]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from hydra import compose, initialize_config_module


def run(recipe: str, steps: int, boundaries: bool, out: Path, extra: list[str]) -> dict:
    from mamba_train.train import train

    overrides = [f"recipe={recipe}", f"trainer.max_steps={steps}", "logger=csv",
                 f"data.document_boundaries={str(boundaries).lower()}",
                 f"train.val_every_n_steps={max(1, steps // 4)}", f"paths.output_dir={out}",
                 f"run_name={recipe}-boundaries-{'on' if boundaries else 'off'}", *extra]
    with initialize_config_module(config_module="mamba_train.conf", version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    result = train(cfg)
    summary = json.loads((result["run_dir"] / "summary.json").read_text())
    return {"boundaries": boundaries, "final_val_loss": summary.get("final_val_loss"),
            "final_train_loss": summary.get("final_train_loss"),
            "wall_time_s": summary.get("wall_time_s"), "run_dir": str(result["run_dir"])}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="debug")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="ablation-"))
    rows = [run(args.recipe, args.steps, b, out, args.overrides) for b in (False, True)]
    print(f"| recipe | steps | document_boundaries | final val loss | final train loss | time (s) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {args.recipe} | {args.steps} | {str(r['boundaries']).lower()} | "
              f"{r['final_val_loss']:.4f} | {r['final_train_loss']:.4f} | {r['wall_time_s']} |")
    (out / "ablation.json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
