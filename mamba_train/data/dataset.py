"""Streaming windows over token shards: shuffled mixtures for training, fixed ones for validation.

A *window* is ``seq_len + 1`` consecutive tokens of a split's stream starting at a multiple of
``seq_len`` (stride ``seq_len``: every token is predicted exactly once per epoch); it becomes
``input_ids = w[:-1]`` and ``labels = w[1:]``. Documents are packed: windows cross document
boundaries, which the EOS ids mark.

Everything is a pure function of integers, so no index is ever materialised:

* global training sample ``i`` -> (source ``s``, its ``n``-th sample) by :class:`~mamba_train.data.sampling.MixSchedule`
  (deterministic weighted interleaving), then ``n`` -> (epoch ``n // N_s``, position
  ``n % N_s``) -> window by a seeded
  :class:`~mamba_train.data.sampling.FeistelPermutation` of ``range(N_s)`` that is new
  every epoch (O(1) memory however large the corpus; sources restart independently, so
  training can stream forever under ``max_steps``);
* ranks: global sample ``i`` belongs to rank ``i % world_size``; its per-rank number is
  ``j = i // world_size``;
* DataLoader workers: the rank's samples are dealt to workers in chunks of one micro-batch
  (``chunk``): batch ``b`` is built by worker ``b % num_workers``. PyTorch collects batches from
  workers round-robin, so the main process sees the rank's samples in order ``j = 0, 1, 2, ...``
  whatever ``num_workers`` is: no overlap, no gap.

Exact resume therefore needs one number, the per-rank count of samples the *main process* has
yielded (samples prefetched by workers are not consumed).
:class:`~mamba_train.data.loader.ResumableDataLoader` keeps that count and is the object
Lightning checkpoints (see its docstring). The integer maths lives in
:mod:`mamba_train.data.sampling`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from mamba_train.data.sampling import M64, FeistelPermutation, MixSchedule, mix64
from mamba_train.data.shards import DataError, TokenShards


class _WindowStream(IterableDataset):
    """Per-rank sample numbering, worker partition and ``[start, stop)`` range of both streams."""

    def __init__(self, paths: Sequence[str | Path], seq_len: int, rank: int, world_size: int):
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in range(world_size={world_size})")
        self.paths = [Path(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]
        if not self.paths:
            raise ValueError("no data sources given")
        self.seq_len, self.rank, self.world_size = int(seq_len), int(rank), int(world_size)
        self.sources = [TokenShards(p) for p in self.paths]
        self.num_windows = [(len(src) - 1) // self.seq_len if len(src) else 0 for src in self.sources]
        for src, n in zip(self.sources, self.num_windows):
            if n < 1:
                raise DataError(
                    f"{src.dir} holds {len(src)} tokens, fewer than one window of seq_len + 1 = "
                    f"{self.seq_len + 1}; add documents or lower seq_len"
                )
        self.start, self.stop, self.chunk = 0, None, 1

    def set_range(self, start: int, stop: int | None, chunk: int = 1) -> None:
        """Yield per-rank samples ``[start, stop)`` (``stop=None``: forever), dealt to workers in
        chunks of ``chunk`` (the micro-batch size). Set before iterating: workers copy it."""
        self.start, self.stop, self.chunk = int(start), stop, max(1, int(chunk))

    def fingerprint(self) -> str:
        return "+".join(src.fingerprint() for src in self.sources)

    def window(self, j: int) -> tuple[int, int]:
        """Per-rank sample ``j`` -> (source index, window index)."""
        raise NotImplementedError

    def sample(self, j: int) -> dict[str, torch.Tensor]:
        s, w = self.window(j)
        tokens = self.sources[s].tokens(w * self.seq_len, (w + 1) * self.seq_len + 1)
        t = torch.from_numpy(tokens.astype(np.int64))
        return {"input_ids": t[:-1], "labels": t[1:]}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        j = self.start + worker * self.chunk
        while self.stop is None or j < self.stop:
            end = j + self.chunk if self.stop is None else min(j + self.chunk, self.stop)
            for k in range(j, end):
                yield self.sample(k)
            j += num_workers * self.chunk


class TokenWindowDataset(_WindowStream):
    """Shuffled training windows from one or more splits (a mixture), infinite by default.

    Args:
        paths: split directories (each with ``index.json``), e.g. ``["data/web/train"]``.
        seq_len: tokens per sample (windows hold ``seq_len + 1``).
        weights: mixture weights (any positive scale); default: equal.
        seed: data order seed; the same seed gives the same stream.
        rank, world_size: this process's data-parallel rank and the number of ranks.
    """

    def __init__(self, paths: Sequence[str | Path] | str | Path, seq_len: int,
                 weights: Sequence[float] | None = None, seed: int = 0, rank: int = 0,
                 world_size: int = 1):
        super().__init__(paths, seq_len, rank, world_size)
        self.weights = [1.0] * len(self.sources) if weights is None else [float(w) for w in weights]
        if len(self.weights) != len(self.sources):
            raise ValueError(f"{len(self.sources)} sources but {len(self.weights)} weights")
        self.seed = int(seed)
        self.schedule = MixSchedule(self.weights, self.seed)
        self._perm_key: tuple[int, int] | None = None
        self._perm: FeistelPermutation | None = None

    def window(self, j: int) -> tuple[int, int]:
        s, n = self.schedule.locate(j * self.world_size + self.rank)
        epoch, k = divmod(n, self.num_windows[s])
        if self._perm_key != (s, epoch):
            key = mix64(mix64(mix64(self.seed & M64) ^ s) ^ epoch)
            self._perm, self._perm_key = FeistelPermutation(self.num_windows[s], key), (s, epoch)
        return s, self._perm(k)

    def epoch_samples(self, batch_size: int) -> int:
        """Per-rank samples in one nominal epoch: all windows of all sources once, rounded down
        to whole global batches (at least one batch). Only bookkeeping for Lightning's epochs:
        the stream itself never ends; each source reshuffles when it runs out."""
        per_rank_batches = sum(self.num_windows) // (self.world_size * batch_size)
        return max(1, per_rank_batches) * batch_size


class ValWindowDataset(_WindowStream):
    """Validation windows in file order, no shuffle, every one each validation.

    Windows of all ``paths`` are enumerated source by source (never across sources), capped at
    ``max_windows``; rank ``r`` takes windows ``r, r + world_size, ...``. The tail that does not
    divide evenly (< world_size windows) is dropped so that every rank runs the same number of
    batches (uneven counts would deadlock synced metrics).
    """

    def __init__(self, paths: Sequence[str | Path] | str | Path, seq_len: int, rank: int = 0,
                 world_size: int = 1, max_windows: int | None = None):
        super().__init__(paths, seq_len, rank, world_size)
        total = sum(self.num_windows) if max_windows is None else min(sum(self.num_windows), max_windows)
        self.per_rank = total // self.world_size
        if self.per_rank < 1:
            raise DataError(
                f"validation data {', '.join(map(str, self.paths))} has {total} windows of "
                f"seq_len={self.seq_len}, fewer than world_size={self.world_size}; raise "
                "prepare's val_fraction or val_windows, or lower seq_len"
            )
        self._starts = np.cumsum([0] + self.num_windows).tolist()
        self.set_range(0, self.per_rank)

    def __len__(self) -> int:
        return self.per_rank

    def window(self, j: int) -> tuple[int, int]:
        g = j * self.world_size + self.rank
        s = int(np.searchsorted(self._starts, g, side="right")) - 1
        return s, g - self._starts[s]
