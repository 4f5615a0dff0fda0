"""The resumable training DataLoader: the per-rank count of consumed samples is its whole state.

The datasets (:mod:`mamba_train.data.dataset`) map a per-rank sample number to a window; this
loader decides which number comes next and saves it in every checkpoint through Lightning's
stateful-loader protocol.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch
from torch.utils.data import DataLoader

from mamba_train.data.dataset import TokenWindowDataset
from mamba_train.data.sampling import MixSchedule
from mamba_train.data.shards import DataError


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
    a run can resume with another ``num_workers``; a different ``world_size`` resumes at the
    same global sample, rounded down to a multiple of it.

    Another micro-batch size or gradient accumulation is refused on resume (``load_state_dict``):
    Lightning restores its count of micro-batches, so its accumulation windows and epoch ends
    would no longer fall on optimizer-step boundaries (a first step over part of a window, with
    a part-scaled gradient, every later boundary shifted). ``accumulate_grad_batches`` is set
    by the datamodule from the Trainer.
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
        self.accumulate_grad_batches: int | None = None
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
        try:
            item = next(self._stream)
        except DataError as e:  # raised in a worker: keep the message, not the worker's traceback
            raise DataError(_worker_message(e)) from None
        self.samples_yielded += item["input_ids"].shape[0]  # consumed in the main process
        self._stream_pos = self.samples_yielded
        return item

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_stream": None, "_stream_pos": -1}

    @property
    def tokens_consumed(self) -> int:
        """Training tokens handed to the model, all ranks together (the windows' inputs)."""
        ds = self.dataset
        return self.samples_yielded * ds.world_size * ds.seq_len

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
            "micro_batch_size": self.batch_size,
            "accumulate_grad_batches": self.accumulate_grad_batches,
        }

    def load_state_dict(self, state: dict) -> None:
        ds = self.dataset
        for key, mine in (("seq_len", ds.seq_len), ("seed", ds.seed), ("weights", list(ds.weights)),
                          ("fingerprint", ds.fingerprint())):
            if not (_same_mixture(state.get(key), ds) if key == "weights" else state.get(key) == mine):
                raise DataError(
                    f"cannot resume the data stream: checkpoint has {key}={state.get(key)!r}, this "
                    f"run has {mine!r}. The saved position only means something for the same data, "
                    "seq_len, seed and weights; restore those, or resume without the loader state "
                    "(the data order then restarts)"
                )
        self._check_batching(state)
        self.samples_yielded = int(state["samples_yielded"]) * int(state["world_size"]) // ds.world_size

    def _check_batching(self, state: dict) -> None:
        old = (state.get("micro_batch_size"), state.get("accumulate_grad_batches"))
        new = (self.batch_size, self.accumulate_grad_batches)
        if None in old or None in new or int(state["world_size"]) != self.dataset.world_size:
            return  # an older checkpoint; another world size changes the accumulation by design
        if tuple(map(int, old)) != new:
            raise DataError(
                f"cannot resume with another batching: the checkpoint was written with "
                f"data.micro_batch_size={old[0]} x {old[1]} accumulated micro-batches per step, "
                f"this run has data.micro_batch_size={new[0]} x {new[1]} (train.global_batch_tokens "
                "and data.micro_batch_size set both). Resume with the checkpoint's values; to "
                "change them, start a new run from its weights (init_from=<checkpoint>)")


def _same_mixture(saved, ds: TokenWindowDataset) -> bool:
    """Weights are ratios: ``[2, 1]`` and ``[1.0, 0.5]`` make the same order (the same
    integer shares of :class:`~mamba_train.data.sampling.MixSchedule`), so either resumes."""
    try:
        return MixSchedule(saved, ds.seed).shares == ds.schedule.shares
    except (TypeError, ValueError):
        return False


def _worker_message(e: DataError) -> str:
    """The original message of a DataError raised in a DataLoader worker (PyTorch re-raises it
    in the main process with the worker's whole traceback as its text)."""
    lines = str(e).strip().splitlines()
    if len(lines) > 1 and "Original Traceback" in lines[1]:
        return lines[-1].split(": ", 1)[-1]
    return str(e)
