"""Host time mamba_train adds per optimizer step, measured against a plain loop, in one process.

Why it matters: with the captured step (``module.cuda_graph``) the GPU work of a step is one
graph replay, so what is left on the host -- Lightning's loop, callbacks, ``self.log``, the
logger -- must stay below the GPU time of a step or it becomes the bound again. This measures
that host cost without a GPU: a model so small that its own compute is negligible runs (a) in
a plain loop (forward, loss, backward, clip, AdamW) and (b) through ``mamba_train.train.train``
with the configured callbacks, once per logger. The difference of the median step times is the
framework's host overhead per step on this CPU.

    python benchmarks/host_overhead.py                  # loggers csv and wandb (offline)
    python benchmarks/host_overhead.py --steps 500 --loggers csv
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

TINY = ["recipe=debug-mamba2", "model.d_model=16", "model.n_layer=1", "data.seq_len=16",
        "data.micro_batch_size=1", "train.global_batch_tokens=16", "data.num_workers=0",
        "trainer.limit_val_batches=0", "train.val_every_n_steps=1000000",
        "train.checkpoint_every_n_steps=1000000", "callbacks.progress_bar=null",
        "trainer.enable_model_summary=false", "trainer.accelerator=cpu"]


class StepClock(L.Callback):
    def __init__(self):
        self.stamps: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.stamps.append(time.perf_counter())


def median_step(stamps: list[float], skip: int) -> float:
    return statistics.median(b - a for a, b in zip(stamps[skip:], stamps[skip + 1:]))


def framework(steps: int, logger: str, out: Path) -> tuple[float, object]:
    from hydra import compose, initialize_config_module

    from mamba_train.train import train

    with initialize_config_module(config_module="mamba_train.conf", version_base="1.3"):
        cfg = compose("config", overrides=[*TINY, f"trainer.max_steps={steps}", f"logger={logger}",
                                           f"run_name={logger}", f"paths.output_dir={out}"])
    clock = StepClock()
    train(cfg, extra_callbacks=[clock])
    return median_step(clock.stamps, steps // 5), cfg


def plain(steps: int, cfg) -> float:
    from hydra.utils import instantiate

    from mamba_train.models.build import build_model

    config = instantiate(cfg.model, _convert_="all")
    model = build_model(config, backend="reference")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, config.vocab_size, (1, 17))
    stamps = []
    for _ in range(steps):
        model(x[:, :-1], labels=x[:, 1:]).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        stamps.append(time.perf_counter())
    return median_step(stamps, steps // 5)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--loggers", nargs="+", default=["csv", "wandb"])
    args = ap.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "offline")
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        results = {logger: framework(args.steps, logger, Path(tmp)) for logger in args.loggers}
        base = plain(args.steps, next(iter(results.values()))[1])
    print(f"HOST plain loop: {base * 1e3:.2f} ms/step")
    for logger, (step, _) in results.items():
        print(f"HOST mamba_train logger={logger}: {step * 1e3:.2f} ms/step, "
              f"overhead {(step - base) * 1e3:.2f} ms/step ({step / base:.2f}x the plain step)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
