"""Streaming windows over token shards: shuffled mixtures for training, fixed ones for validation.

A *window* is ``seq_len + 1`` consecutive tokens of a split's stream starting at a multiple of
``seq_len`` (stride ``seq_len``: every token is predicted exactly once per epoch); it becomes
``input_ids = w[:-1]`` and ``labels = w[1:]``. Documents are packed: windows cross document
boundaries, which the EOS ids mark.

Everything is a pure function of integers, so no index is ever materialised:

* global training sample ``i`` -> (source ``s``, its ``n``-th sample) by :class:`MixSchedule`
  (deterministic weighted interleaving), then ``n`` -> (epoch ``n // N_s``, position
  ``n % N_s``) -> window by a seeded :class:`FeistelPermutation` of ``range(N_s)`` that is new
  every epoch (O(1) memory however large the corpus; sources restart independently, so
  training can stream forever under ``max_steps``);
* ranks: global sample ``i`` belongs to rank ``i % world_size``; its per-rank number is
  ``j = i // world_size``;
* DataLoader workers: the rank's samples are dealt to workers in chunks of one micro-batch
  (``chunk``): batch ``b`` is built by worker ``b % num_workers``. PyTorch collects batches from
  workers round-robin, so the main process sees the rank's samples in order ``j = 0, 1, 2, ...``
  whatever ``num_workers`` is: no overlap, no gap.

Exact resume therefore needs one number, the per-rank count of samples the *main process* has
yielded (samples prefetched by workers are not consumed). :class:`ResumableDataLoader` keeps
that count and is the object Lightning checkpoints (see its docstring).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mamba_train.data.shards import DataError, TokenShards

_M64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """splitmix64 finaliser: a fast, well-mixed 64-bit hash of an integer."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


class FeistelPermutation:
    """A seeded bijection of ``range(n)`` computed per index in O(1) memory.

    A 6-round balanced Feistel network permutes ``[0, 4**h)`` (the smallest such range covering
    ``n``); indices that land outside ``range(n)`` are pushed through again ("cycle walking"),
    which keeps it a bijection of ``range(n)``; on average fewer than 4 passes.
    """

    ROUNDS = 6

    def __init__(self, n: int, key: int):
        if n < 1:
            raise ValueError(f"cannot permute an empty range (n={n})")
        self.n = n
        self.half = max(1, ((n - 1).bit_length() + 1) // 2)
        self.mask = (1 << self.half) - 1
        self.keys = [_mix64((key & _M64) ^ _mix64(r)) for r in range(self.ROUNDS)]

    def __call__(self, i: int) -> int:
        if not 0 <= i < self.n:
            raise IndexError(f"{i} not in range({self.n})")
        x = i
        while True:
            left, right = x >> self.half, x & self.mask
            for k in self.keys:
                left, right = right, left ^ (_mix64(right ^ k) & self.mask)
            x = (left << self.half) | right
            if x < self.n:
                return x


class MixSchedule:
    """Deterministic weighted interleaving of ``K`` sources (stride scheduling), O(1) per lookup.

    Source ``s`` has integer share ``a_s`` (its weight, normalised to 2**20) and a seeded phase
    ``p_s``; its ``n``-th sample fires at time ``(n * P + p_s) / a_s``. The global sample order
    is all firings sorted by (time, source). So every prefix of ``i`` samples holds
    ``i * w_s`` samples of each source, to within one, and (the point of it) ``locate(i)`` is
    computed in closed form with exact integer arithmetic: resume at sample 10**9 costs the
    same as at sample 0, with no replay.
    """

    P = 1 << 20

    def __init__(self, weights: Sequence[float], seed: int = 0):
        weights = [float(w) for w in weights]
        if not weights or any(not (w > 0) or math.isinf(w) for w in weights):
            raise ValueError(f"mixture weights must be finite and > 0, got {weights}")
        total = sum(weights)
        self.shares = [max(1, round(w / total * self.P)) for w in weights]
        self.phases = [_mix64(_mix64(seed & _M64) ^ s) % self.P for s in range(len(weights))]
        self.total_share = sum(self.shares)

    def __len__(self) -> int:
        return len(self.shares)

    def locate(self, i: int) -> tuple[int, int]:
        """Global sample ``i`` is sample number ``n`` of source ``s``: returns ``(s, n)``."""
        if len(self.shares) == 1:
            return 0, i
        k = len(self.shares)
        for s, a_s in enumerate(self.shares):
            guess = i * a_s // self.total_share
            lo, hi = max(0, guess - 2 * k - 2), guess + 2 * k + 2
            if lo and self._rank(s, lo) >= i:
                lo = 0
            if self._rank(s, hi) < i:
                hi = i
            while lo < hi:  # smallest n with rank(s, n) >= i
                mid = (lo + hi) // 2
                if self._rank(s, mid) >= i:
                    hi = mid
                else:
                    lo = mid + 1
            if self._rank(s, lo) == i:
                return s, lo
        raise AssertionError(f"no source owns sample {i}")  # unreachable: ranks are a bijection

    def _rank(self, s: int, n: int) -> int:
        """Position of firing ``(s, n)`` in the global order: how many firings precede it."""
        P, a_s, p_s = self.P, self.shares[s], self.phases[s]
        rank = n
        for r, (a_r, p_r) in enumerate(zip(self.shares, self.phases)):
            if r == s:
                continue
            y = (n * P + p_s) * a_r - p_r * a_s  # firing (r, m) precedes iff m*P*a_s < y (or ties)
            if y < 0:
                continue
            q, rem = divmod(y, P * a_s)
            rank += q + (rem > 0) + (rem == 0 and r < s)
        return rank


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
            key = _mix64(_mix64(_mix64(self.seed & _M64) ^ s) ^ epoch)
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


class ResumableDataLoader(DataLoader):
    """The training DataLoader: counts consumed samples in the main process, so it can resume.

    Lightning (2.x) checkpoints the *train DataLoader objects* it iterates: ``fit_loop`` saves
    ``CombinedLoader._state_dicts()``, i.e. ``state_dict()`` of every loader that has
    ``state_dict``/``load_state_dict`` (the ``_Stateful`` protocol), and calls
    ``load_state_dict`` on restart before it creates the iterator. The dataset is never asked.

    ``len(loader)`` is one nominal epoch (:meth:`TokenWindowDataset.epoch_samples`, or
    ``epoch_batches``) and each ``iter()`` yields the rest of the current epoch. A length
    matters: without one, Lightning's fetcher pre-fetches one batch ahead, so a checkpoint
    written after step *k* would count *k + 1* batches and the resumed run would skip one
    (tested: ``tests/test_data_datamodule.py``).

    Epochs are slices of one endless stream: the workers are started once and kept across
    epochs (so a tiny corpus does not pay a worker restart every few batches; do not pass
    ``persistent_workers``), and restarted at the right position only after
    ``load_state_dict``. The state is the per-rank sample count, not a per-worker position, so
    a run can resume with another ``num_workers`` (or ``batch_size``); a different
    ``world_size`` resumes at the same global sample, rounded down to a multiple of it.
    """

    def __init__(self, dataset: TokenWindowDataset, batch_size: int, num_workers: int = 0,
                 pin_memory: bool = False, epoch_batches: int | None = None, **kwargs):
        if kwargs.pop("persistent_workers", False):
            raise ValueError("ResumableDataLoader keeps its workers itself; do not pass persistent_workers")
        kwargs.pop("drop_last", None)  # the stream is endless: every batch is full
        super().__init__(dataset, batch_size=batch_size, num_workers=num_workers,
                         pin_memory=pin_memory, drop_last=True, **kwargs)
        if epoch_batches is not None and epoch_batches < 1:
            raise ValueError(f"epoch_batches must be >= 1, got {epoch_batches}")
        self.epoch_batches = epoch_batches
        self.samples_yielded = 0
        self._stream: Iterator | None = None
        self._stream_pos = -1

    def __len__(self) -> int:
        return self._epoch_samples() // self.batch_size

    def _epoch_samples(self) -> int:
        if self.epoch_batches is not None:
            return self.epoch_batches * self.batch_size
        return self.dataset.epoch_samples(self.batch_size)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        per_epoch = self._epoch_samples()
        epoch_end = (self.samples_yielded // per_epoch + 1) * per_epoch
        for _ in range(math.ceil((epoch_end - self.samples_yielded) / self.batch_size)):
            yield self._next_batch()

    def _next_batch(self) -> dict[str, torch.Tensor]:
        if self._stream is None or self._stream_pos != self.samples_yielded:
            self._stream = None  # shuts down the old workers
            self.dataset.set_range(self.samples_yielded, None, self.batch_size)  # workers copy it
            self._stream, self._stream_pos = super().__iter__(), self.samples_yielded
        item = next(self._stream)
        self.samples_yielded += item["input_ids"].shape[0]  # consumed in the main process
        self._stream_pos = self.samples_yielded
        return item

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_stream": None, "_stream_pos": -1}

    @property
    def epoch(self) -> int:
        return self.samples_yielded // self._epoch_samples()

    def state_dict(self) -> dict:
        ds = self.dataset
        return {
            "samples_yielded": self.samples_yielded,  # per rank, consumed by the main process
            "world_size": ds.world_size,
            "epoch": self.epoch,  # informative
            "seed": ds.seed,
            "seq_len": ds.seq_len,
            "weights": list(ds.weights),
            "fingerprint": ds.fingerprint(),
        }

    def load_state_dict(self, state: dict) -> None:
        ds = self.dataset
        for key, mine in (("seq_len", ds.seq_len), ("seed", ds.seed), ("weights", list(ds.weights)),
                          ("fingerprint", ds.fingerprint())):
            if state.get(key) != mine:
                raise DataError(
                    f"cannot resume the data stream: checkpoint has {key}={state.get(key)!r}, this "
                    f"run has {mine!r}. The saved position only means something for the same data, "
                    "seq_len, seed and weights; restore those, or resume without the loader state "
                    "(the data order then restarts)"
                )
        self.samples_yielded = int(state["samples_yielded"]) * int(state["world_size"]) // ds.world_size
