"""``TokenDataModule``: prepared token shards -> Lightning train/val dataloaders.

Hydra::

    data:
      _target_: mamba_train.data.datamodule.TokenDataModule
      path: /data/pile_neox        # a prepare out= dir (train/ + val/); null = embedded corpus
      seq_len: 2048
      micro_batch_size: 8
      num_workers: 2
      seed: 1234
      tokenizer: EleutherAI/gpt-neox-20b
      expected_vocab_size: ${model.vocab_size}

or a mixture: ``sources: [{path: /data/web, weight: 0.7}, {path: /data/code, weight: 0.3}]``.

``setup()`` validates everything that can be checked before the first step (directories,
truncated shards, vocabulary vs tokenizer and model, enough tokens for one window), so a bad
path fails in seconds with a message that names the file, not hours later in a worker.

Resume: the train loader is a :class:`~mamba_train.data.loader.ResumableDataLoader`, which
Lightning checkpoints and restores by itself (``fit_loop`` state ``combined_loader``); the
loader is created once and returned again by later ``train_dataloader()`` calls, so even
``reload_dataloaders_every_n_epochs`` keeps the position. With ``path=None`` the embedded
default corpus is tokenized on first use into ``~/.cache/mamba_train/default_data/<hash>``
(``$MAMBA_TRAIN_CACHE`` or ``cache_dir`` to move it), by the same code as ``prepare``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import warnings
from pathlib import Path
import lightning as L
import torch
from torch.utils.data import DataLoader

from mamba_train.data.boundaries import add_document_boundaries
from mamba_train.data.dataset import TokenWindowDataset, ValWindowDataset
from mamba_train.data.loader import ResumableDataLoader
from mamba_train.data.shards import FORMAT_VERSION, DataError, validate_dataset
from mamba_train.data.tokenizer import (DEFAULT_TOKENIZER_DIR, eos_id, load_tokenizer,
                                        tokenizer_name, vocab_size)

# Lightning warns about any IterableDataset loader with a length, in case workers duplicate
# data; ours deal disjoint windows to workers (tested), so the length is exact.
warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined")


class TokenDataModule(L.LightningDataModule):
    """Train/val loaders over prepared token shards.

    Args:
        path: a ``prepare`` output directory holding ``train/`` and ``val/``; ``None`` (and no
            ``sources``) uses the embedded default corpus, built on first use.
        sources: a mixture instead of ``path``: ``[{"path": dir, "weight": w}, ...]``. Training
            interleaves them by weight; validation covers every source's ``val/``.
        seq_len: tokens per training sample.
        micro_batch_size: samples per training batch on each rank.
        val_seq_len: tokens per validation window; ``None`` = ``seq_len``. Another length
            measures length extrapolation (train at 2k, validate at 8k). Validation batches keep
            the training batch's token count: ``max(1, micro_batch_size * seq_len // val_seq_len)``
            windows each.
        num_workers: DataLoader worker processes (0 = load in the training process).
        seed: data order seed.
        tokenizer: the tokenizer the run uses (name/path, as for ``prepare``); the data must
            have been tokenized with the same vocabulary and EOS. ``None`` skips the check.
        expected_vocab_size: the model's ``vocab_size``; the data must match it.
        val_windows: cap on validation windows (all ranks together); ``None`` = all.
        checksums: verify every shard's sha256 in ``setup()`` (reads all the data once).
        pin_memory: pin batches for faster host-to-GPU copies; ``None`` = when CUDA is available.
        cache_dir: where the default corpus is built (default ``~/.cache/mamba_train``).
        document_boundaries: add ``seq_idx`` (document number per token, from the EOS
            positions) to every batch so the model resets its state between packed documents
            (``mamba_train/data/boundaries.py``).
        mask_cross_document_loss: with boundaries, do not train on predicting a document's
            first token from the previous document's EOS.
        epoch_batches: length of a Lightning epoch in micro-batches; default one pass over the
            training data. Tiny corpora make short epochs (the default corpus: 6 batches of
            8 x 2048); raise it, e.g. to a multiple of ``accumulate_grad_batches``, so that
            gradient accumulation never straddles an epoch end.
    """

    def __init__(self, path: str | None = None, sources: list[dict] | None = None,
                 seq_len: int = 2048, micro_batch_size: int = 8, num_workers: int = 2,
                 seed: int = 1234, tokenizer: str | None = "default",
                 expected_vocab_size: int | None = None, val_windows: int | None = None,
                 checksums: bool = False, pin_memory: bool | None = None,
                 cache_dir: str | None = None, epoch_batches: int | None = None,
                 document_boundaries: bool = False, mask_cross_document_loss: bool = False,
                 val_seq_len: int | None = None):
        super().__init__()
        self.document_boundaries = document_boundaries
        self.mask_cross_document_loss = mask_cross_document_loss
        if mask_cross_document_loss and not document_boundaries:
            raise DataError("data.mask_cross_document_loss needs data.document_boundaries=true")
        if path is not None and sources:
            raise DataError("give either data.path or data.sources, not both")
        # Hydra hands OmegaConf containers; checkpoints keep these hyperparameters, and the
        # weights-only loader of a resume refuses any class it does not know (ListConfig)
        sources = _plain(sources)
        self.save_hyperparameters()
        self.path = path
        self.sources = _checked_sources(sources) if sources else None
        self.seq_len, self.micro_batch_size = int(seq_len), int(micro_batch_size)
        self.val_seq_len = self.seq_len if val_seq_len is None else int(val_seq_len)
        if self.val_seq_len < 1:
            raise DataError(f"data.val_seq_len must be >= 1 (or null = seq_len), got {val_seq_len}")
        # validation batches hold as many tokens as training micro-batches (memory stays put)
        self.val_batch_size = max(1, self.micro_batch_size * self.seq_len // self.val_seq_len)
        self.num_workers, self.seed = int(num_workers), int(seed)
        self.tokenizer = tokenizer
        self.expected_vocab_size = expected_vocab_size
        self.val_windows, self.checksums = val_windows, checksums
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.cache_dir = cache_dir
        self.epoch_batches = epoch_batches
        self.index: dict | None = None  # index.json of the (first) train split, after setup()
        self._train_loader: ResumableDataLoader | None = None
        self._train_ds: TokenWindowDataset | None = None
        self._val_ds: ValWindowDataset | None = None

    # ------------------------------------------------------------------ Lightning hooks
    def prepare_data(self) -> None:
        """Build the default corpus if needed (Lightning runs this once per node)."""
        if self._uses_default_data():
            ensure_default_data(self.tokenizer or "default", self.cache_dir)

    def setup(self, stage: str | None = None) -> None:
        roots, weights = self._roots()
        rank, world = self._rank_world()
        if self.index is None:  # once: with checksums=True it reads every byte
            indexes = [self._validate(root / split, length) for root in roots
                       for split, length in self._split_lengths()]
            self._check_tokenizer(indexes)
            self.index = indexes[0]
        if self._train_ds is None or (self._train_ds.rank, self._train_ds.world_size) != (rank, world):
            # (re)built when the rank is known: setup() may have run before a Trainer attached
            self._train_ds = TokenWindowDataset([r / "train" for r in roots], self.seq_len, weights,
                                                self.seed, rank, world)
            if len(self._split_lengths()) > 1:
                self._val_ds = ValWindowDataset([r / "val" for r in roots], self.val_seq_len, rank,
                                                world, self.val_windows)
                self._val_ds.set_range(0, len(self._val_ds), self.val_batch_size)
            if self._train_loader is not None:
                state, self._train_loader = self._train_loader.state_dict(), None
                self.train_dataloader().load_state_dict(state)

    def train_dataloader(self) -> ResumableDataLoader:
        if self._train_ds is None:
            self.setup("fit")
        if self._train_loader is None:
            self._train_loader = ResumableDataLoader(
                self._train_ds, batch_size=self.micro_batch_size, num_workers=self.num_workers,
                pin_memory=self.pin_memory, epoch_batches=self.epoch_batches)
        trainer = self.trainer
        if trainer is not None:  # saved with the position: a resume refuses other batching
            self._train_loader.accumulate_grad_batches = int(trainer.accumulate_grad_batches)
        return self._train_loader

    @property
    def train_tokens_consumed(self) -> int | None:
        """Training tokens handed out so far, all ranks (None before training)."""
        return self._train_loader.tokens_consumed if self._train_loader is not None else None

    def val_dataloader(self) -> DataLoader:
        if self._val_ds is None:
            self.setup("validate")
        return DataLoader(self._val_ds, batch_size=self.val_batch_size,
                          num_workers=self.num_workers, pin_memory=self.pin_memory)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        if self.document_boundaries:
            add_document_boundaries(batch, self.eos_id, self.mask_cross_document_loss)
        return batch

    def check_paths(self) -> None:
        """Refuse a missing split before loggers and the Trainer start (setup() reads the data
        later, once the rank is known); the default corpus is built in prepare_data instead."""
        if self._uses_default_data():
            return
        for root in self._roots()[0]:
            for split, length in self._split_lengths():
                if not (root / split).is_dir():
                    self._validate(root / split, length)  # raises the DataError that says what to do

    # ------------------------------------------------------------------ facts for the model
    @property
    def vocab_size(self) -> int:
        """Vocabulary size the data was tokenized with (after ``setup()``)."""
        return int(self._require_index()["tokenizer"]["vocab_size"])

    @property
    def eos_id(self) -> int:
        return int(self._require_index()["tokenizer"]["eos_id"])

    # ------------------------------------------------------------------ helpers
    def _uses_default_data(self) -> bool:
        return self.path is None and not self.sources

    def _split_lengths(self) -> tuple[tuple[str, int], ...]:
        """Each split and the window length it must hold at least one of (plus one token);
        no val split when the Trainer validates nothing (``trainer.limit_val_batches=0``)."""
        if self.trainer is not None and self.trainer.limit_val_batches == 0:
            return (("train", self.seq_len),)
        return ("train", self.seq_len), ("val", self.val_seq_len)

    def _roots(self) -> tuple[list[Path], list[float]]:
        if self._uses_default_data():
            return [ensure_default_data(self.tokenizer or "default", self.cache_dir)], [1.0]
        if self.path is not None:
            return [Path(self.path).expanduser()], [1.0]
        return ([Path(s["path"]).expanduser() for s in self.sources],
                [float(s.get("weight", 1.0)) for s in self.sources])

    def _validate(self, split_dir: Path, seq_len: int) -> dict:
        parent = split_dir.parent
        if not split_dir.is_dir() and parent.is_dir() and (parent / "index.json").is_file():
            raise DataError(f"{parent} is a single split, not a prepare output; give the "
                            f"directory that holds train/ and val/ (probably {parent.parent})")
        try:
            return validate_dataset(split_dir, self.expected_vocab_size, self.checksums,
                                    min_tokens=seq_len + 1)
        except DataError as e:
            if split_dir.name != "val" or "fewer than" not in str(e):
                raise
            raise DataError(f"{e}; or train without validation: trainer.limit_val_batches=0") from None

    def _check_tokenizer(self, indexes: list[dict]) -> None:
        toks = {(i["tokenizer"]["vocab_size"], i["tokenizer"]["eos_id"]) for i in indexes}
        if len(toks) > 1:
            raise DataError(f"the data sources were tokenized with different tokenizers "
                            f"{[i['tokenizer'] for i in indexes]}; re-prepare them with one")
        if self.tokenizer is None:
            return
        data = indexes[0]["tokenizer"]
        if data["name"] == tokenizer_name(self.tokenizer):
            return
        tok = load_tokenizer(self.tokenizer)
        if (data["vocab_size"], data["eos_id"]) != (vocab_size(tok), eos_id(tok)):
            raise DataError(
                f"the data was tokenized with {data['name']!r} (vocab_size={data['vocab_size']}, "
                f"eos_id={data['eos_id']}) but this run uses tokenizer {self.tokenizer!r} "
                f"(vocab_size={vocab_size(tok)}, eos_id={eos_id(tok)}); re-run prepare with "
                f"tokenizer={self.tokenizer} or set data.tokenizer to {data['name']!r}")

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is not None:
            # the data-parallel rank: the ranks of a context-parallel group read the same windows
            shard = getattr(trainer.strategy, "distributed_sampler_kwargs", None)
            if shard:
                return shard["rank"], shard["num_replicas"]
            return trainer.global_rank, trainer.world_size
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def _require_index(self) -> dict:
        if self.index is None:
            raise RuntimeError("call setup() first")
        return self.index


def _checked_sources(sources) -> list[dict]:
    """``data.sources`` as plain dicts, each with a path and a finite weight > 0 (the mixture's
    sampler divides by the weights)."""
    import math

    if not isinstance(sources, (list, tuple)):
        raise DataError(f"data.sources={sources!r} must be a list like [{{path: dir, weight: 1}}, ...]")
    for s in sources:
        if not isinstance(s, dict) or "path" not in s:
            raise DataError(f"each of data.sources needs a 'path' (and optional 'weight'), got {s!r}")
        w = s.get("weight", 1.0)
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w <= 0:
            raise DataError(f"data.sources weight of {s['path']} must be a finite number > 0, got {w!r}")
    return [dict(s) for s in sources]


def _plain(value):
    """OmegaConf containers -> plain lists/dicts (other values unchanged)."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value


def default_data_dir(tokenizer: str = "default", cache_dir: str | Path | None = None) -> Path:
    """Where the embedded corpus tokenized with ``tokenizer`` is cached (content-addressed)."""
    from mamba_train.data.default_corpus import default_corpus_hash

    root = Path(cache_dir or os.environ.get("MAMBA_TRAIN_CACHE")
                or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "mamba_train").expanduser()
    key = f"{FORMAT_VERSION}|{default_corpus_hash()}|{tokenizer_name(tokenizer)}"
    if tokenizer_name(tokenizer) == "default":
        key += "|" + hashlib.sha256((DEFAULT_TOKENIZER_DIR / "tokenizer.json").read_bytes()).hexdigest()
    return root / "default_data" / hashlib.sha256(key.encode()).hexdigest()[:16]


def ensure_default_data(tokenizer: str = "default", cache_dir: str | Path | None = None) -> Path:
    """Build (once) and return the default corpus directory. Built in a private temporary
    directory then renamed into place, so concurrent processes never see a partial one."""
    from mamba_train.data.prepare import PROGRESS_FILE, PrepareConfig, prepare

    out = default_data_dir(tokenizer, cache_dir)
    if (out / "train" / "index.json").is_file() and (out / "val" / "index.json").is_file():
        return out
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    prepare(PrepareConfig(source="default", out=str(tmp), tokenizer=tokenizer, num_proc=1), final_dir=out)
    try:
        os.rename(tmp, out)
    except OSError:  # another process finished first
        if not (out / PROGRESS_FILE).is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return out

