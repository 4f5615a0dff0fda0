"""How fast does the training DataLoader deliver tokens, next to what a GPU consumes?

    python benchmarks/loader_throughput.py [--path PREPARED_DIR] [--batches 300]

Builds the embedded default corpus (or uses ``--path``, a ``prepare`` out dir), then times the
``TokenDataModule`` train loader yielding micro-batches of 8 x 2048 tokens for each
``--workers`` value, iterating across its nominal epochs exactly as Lightning does (so worker
restarts at epoch boundaries are included: on the ~100k-token default corpus an epoch is only
6 batches, the worst case). The loader must outpace mamba-370m training on one H100,
~65,500 tokens/s (benchmarks/results/2026-11-23-captured-step-throughput.md), by at least
20x so that data loading never shows up in a step; the script exits non-zero if it does not.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout

from mamba_train.data.datamodule import TokenDataModule  # noqa: E402

GPU_TOKENS_PER_S = 65_500  # mamba-370m on 1x H100 (reference notes, 2026-11-23)
REQUIRED_RATIO = 20.0


def measure(path: str | None, cache_dir: str, workers: int, seq_len: int, batch: int,
            batches: int, warmup: int) -> tuple[float, int]:
    dm = TokenDataModule(path=path, seq_len=seq_len, micro_batch_size=batch, num_workers=workers,
                         pin_memory=False, cache_dir=cache_dir)
    dm.prepare_data()
    dm.setup("fit")
    loader = dm.train_dataloader()

    def stream():
        while True:  # Lightning re-iterates the loader every (nominal) epoch
            yield from loader

    it = stream()
    for _ in range(warmup):
        next(it)
    start = time.perf_counter()
    tokens = 0
    for _ in range(batches):
        tokens += next(it)["input_ids"].numel()
    return tokens / (time.perf_counter() - start), len(loader)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", default=None, help="prepare out dir (default: embedded corpus)")
    parser.add_argument("--cache-dir", default=None, help="where to build the default corpus")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="mamba_train_bench_")

    print(f"data: {args.path or 'embedded default corpus'}; micro-batch {args.batch} x {args.seq_len} tokens")
    print(f"GPU reference: mamba-370m on 1x H100 consumes ~{GPU_TOKENS_PER_S:,} tokens/s")
    ok = True
    for workers in args.workers:
        rate, epoch_batches = measure(args.path, cache_dir, workers, args.seq_len, args.batch,
                                      args.batches, args.warmup)
        ratio = rate / GPU_TOKENS_PER_S
        ok &= ratio >= REQUIRED_RATIO
        print(f"num_workers={workers}: {rate:>13,.0f} tokens/s  = {ratio:6.1f}x the GPU rate "
              f"({'ok' if ratio >= REQUIRED_RATIO else 'TOO SLOW'}, need >= {REQUIRED_RATIO:.0f}x; "
              f"epoch = {epoch_batches} batches)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
