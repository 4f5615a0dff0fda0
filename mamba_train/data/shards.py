"""The on-disk format of pre-tokenized data: raw token shards plus an ``index.json``.

A split (``out/train``, ``out/val``) is a directory::

    index.json         {format_version, split, tokenizer: {name, vocab_size, eos_id}, dtype,
                        tokens_per_shard, shards: [{file, num_tokens, sha256, max_token_id}],
                        total_tokens, sources}
    shard_00000.bin    raw little-endian tokens (uint16 if vocab < 65536, else uint32),
    shard_00001.bin    exactly ``tokens_per_shard`` each; the last one may be shorter
    ...

The shards concatenate into one token stream in which every document is followed by the EOS
id. Why home-made rather than litdata (``optimize`` + ``TokensLoader``) or MosaicML streaming:
the files are plain arrays that ``np.memmap`` reads with zero dependencies and zero parsing;
the position of training window *k* is integer arithmetic (token ``k * seq_len``), so a
shuffled permutation, any (rank x worker) partition and an exact resume are a few lines of
code we can test exhaustively, instead of state hidden in a library's chunk cache. Anything
(numpy, C, ``dd``) can inspect a shard, and ``sha256`` in the index catches bit rot.

Files are written to ``*.tmp`` then ``os.replace``-d, and ``index.json`` is written last, so a
directory with an index is complete.

Token ids outside the vocabulary (a flipped high byte, data of another tokenizer) would index
past the embedding: an IndexError deep in the model on CPU, a device-side assert on a GPU. The
largest id of each shard is recorded at write time and checked against the vocabulary when the
split is validated, and every window read is range-checked (one vectorised ``max`` of
``seq_len + 1`` integers, in the loader workers): the error names the shard and the position.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import json
import os
import re
import socket
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from mamba_train.errors import MambaTrainError
from mamba_train.fileio import atomic_write_bytes, atomic_write_json  # noqa: F401  (re-exported)
from mamba_train.fileio import exclusive_lock, release_lock

FORMAT_VERSION = 1
INDEX_FILE = "index.json"
LOCK_FILE = ".prepare.lock"
# fileio.atomic_write's temporary files: ".<name>.<random>.tmp"
_PARTIAL = re.compile(r"^\.(shard_\d+\.bin|index\.json|progress\.json)\..+\.tmp$")


class DataError(MambaTrainError, ValueError):
    """Unusable data; the message names the file and what to do about it."""


def dtype_for_vocab(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 65536 else "uint32"


def shard_name(i: int) -> str:
    return f"shard_{i:05d}.bin"


class ShardWriter:
    """Appends token arrays and cuts them into fixed-size shards as they fill up.

    ``state()``/``ShardWriter(..., state=...)`` let ``prepare`` resume after the last complete
    shard. Call ``finish()`` to write the short last shard and ``index.json``.
    """

    def __init__(self, out_dir: str | Path, tokens_per_shard: int, tokenizer: dict,
                 split: str, sources: list[str] | None = None, state: dict | None = None):
        if tokens_per_shard < 1:
            raise ValueError(f"tokens_per_shard must be >= 1, got {tokens_per_shard}")
        self.dir = Path(out_dir)
        self.tokens_per_shard = int(tokens_per_shard)
        self.tokenizer = dict(tokenizer)
        self.dtype = np.dtype(dtype_for_vocab(int(tokenizer["vocab_size"]))).newbyteorder("<")
        self.split = split
        self.sources = list(sources or [])
        self.shards: list[dict] = list((state or {}).get("shards", []))
        self._buf: list[np.ndarray] = []
        self._buffered = 0

    @property
    def tokens_written(self) -> int:
        return sum(s["num_tokens"] for s in self.shards)

    @property
    def buffered(self) -> int:
        return self._buffered

    def state(self) -> dict:
        """The complete shards; what ``prepare`` records to resume from."""
        return {"shards": list(self.shards)}

    def add(self, tokens: np.ndarray) -> int:
        """Buffer ``tokens``; write every shard that is now full. Returns shards written."""
        if len(tokens) == 0:
            return 0
        self._buf.append(np.asarray(tokens))
        self._buffered += len(tokens)
        written = 0
        while self._buffered >= self.tokens_per_shard:
            self._write(self._take(self.tokens_per_shard))
            written += 1
        return written

    def finish(self) -> dict:
        """Write the remainder as the last shard, then ``index.json``; returns the index."""
        if self._buffered:
            self._write(self._take(self._buffered))
        index = {
            "format_version": FORMAT_VERSION,
            "split": self.split,
            "tokenizer": self.tokenizer,
            "dtype": self.dtype.name,
            "tokens_per_shard": self.tokens_per_shard,
            "shards": self.shards,
            "total_tokens": self.tokens_written,
            "sources": self.sources,
        }
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.dir / INDEX_FILE, index)
        return index

    def _take(self, n: int) -> np.ndarray:
        flat = np.concatenate(self._buf) if len(self._buf) > 1 else self._buf[0]
        out, rest = flat[:n], flat[n:]
        self._buf = [rest] if len(rest) else []
        self._buffered = len(rest)
        return out

    def _write(self, tokens: np.ndarray) -> None:
        max_id = int(tokens.max()) if tokens.size else -1  # one pass: checked, then recorded
        if max_id >= np.iinfo(self.dtype).max + 1:
            raise DataError(f"token id {max_id} does not fit {self.dtype.name}")
        data = np.ascontiguousarray(tokens, dtype=self.dtype).tobytes()
        name = shard_name(len(self.shards))
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.dir / name, data)
        self.shards.append({"file": name, "num_tokens": int(tokens.size),
                            "sha256": hashlib.sha256(data).hexdigest(),
                            "max_token_id": max_id})


@contextlib.contextmanager
def locked_output(out: Path) -> Iterator[None]:
    """Hold ``out``'s lock while a prepare writes there, after removing the partial files of a
    killed one. Two prepares into one ``out`` (other settings, or the same twice) would
    interleave their shards: the second refuses in one line naming the first."""
    out.mkdir(parents=True, exist_ok=True)
    fd, holder = exclusive_lock(out / LOCK_FILE, f"pid {os.getpid()} on {socket.gethostname()}\n")
    if fd is None:
        raise DataError(f"out={out} is being written by another prepare ({holder}); wait for it "
                        "to finish (a rerun then continues or finds it complete), or use another out=")
    try:
        for directory in (out, *(p for p in out.iterdir() if p.is_dir() and not p.is_symlink())):
            for p in directory.iterdir():
                if _PARTIAL.match(p.name) and p.is_file():
                    p.unlink()
        yield
    finally:
        release_lock(fd)


def is_fresh_output(out: Path, splits: tuple[str, ...]) -> bool:
    """Nothing in ``out`` but the lock and empty split directories (a prepare killed before it
    recorded its first shard; its partial files are removed by :func:`locked_output`)."""
    return all(p.name == LOCK_FILE or (p.name in splits and p.is_dir() and not any(p.iterdir()))
               for p in out.iterdir())


def write_tokens(out_dir: str | Path, tokens: np.ndarray, tokenizer: dict,
                 tokens_per_shard: int = 1 << 24, split: str = "train",
                 sources: list[str] | None = None) -> dict:
    """Write one token array as a complete split directory (tests, tools); returns the index."""
    writer = ShardWriter(out_dir, tokens_per_shard, tokenizer, split, sources)
    writer.add(np.asarray(tokens))
    return writer.finish()


def read_index(directory: str | Path) -> dict:
    """Parse ``index.json`` of a split directory (raises :class:`DataError` if absent/bad)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(
            f"data directory {directory} does not exist; build it with "
            f"`python -m mamba_train.data.prepare source=... out={directory.parent}`"
        )
    path = directory / INDEX_FILE
    if not path.is_file():
        raise DataError(
            f"{path} is missing: {directory} is not a prepared split (or prepare did not finish); "
            "re-run `python -m mamba_train.data.prepare` with the same out=, it resumes"
        )
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON ({e}); re-run prepare into a fresh out=") from e
    if not isinstance(index, dict) or index.get("format_version") != FORMAT_VERSION:
        version = index.get("format_version") if isinstance(index, dict) else None
        raise DataError(
            f"{path} has format_version {version!r}, this code reads "
            f"{FORMAT_VERSION}; re-run prepare with this version of mamba_train"
        )
    _check_index_fields(path, index)
    return index


_INDEX_FIELDS = {"tokenizer": dict, "dtype": str, "shards": list, "total_tokens": int}
_TOKENIZER_FIELDS = {"name": str, "vocab_size": int, "eos_id": int}
_SHARD_FIELDS = {"file": str, "num_tokens": int, "sha256": str}


def _check_index_fields(path: Path, index: dict) -> None:
    """Every field the reader uses, with its type: one line naming the first that is wrong."""
    def require(obj: dict, fields: dict, where: str) -> None:
        for key, kind in fields.items():
            if not isinstance(obj.get(key), kind) or (kind is int and isinstance(obj[key], bool)):
                got = "missing" if key not in obj else f"{type(obj[key]).__name__} {obj[key]!r}"[:80]
                raise DataError(f"{path}: {where}{key} must be a {kind.__name__}, got {got}; the "
                                "index is damaged or hand-edited: re-run prepare into a fresh out=")
    require(index, _INDEX_FIELDS, "")
    require(index["tokenizer"], _TOKENIZER_FIELDS, "tokenizer.")
    for i, shard in enumerate(index["shards"]):
        if not isinstance(shard, dict):
            raise DataError(f"{path}: shards[{i}] is not an object; re-run prepare into a fresh out=")
        require(shard, _SHARD_FIELDS, f"shards[{i}].")
        if "/" in shard["file"] or shard["file"].startswith("."):
            raise DataError(f"{path}: shards[{i}].file={shard['file']!r} is not a shard file name "
                            "of this directory; re-run prepare into a fresh out=")
    if index["dtype"] not in ("uint16", "uint32"):
        raise DataError(f"{path}: dtype={index['dtype']!r} is not a token dtype (uint16 or "
                        "uint32); re-run prepare into a fresh out=")


def validate_dataset(directory: str | Path, expected_vocab_size: int | None = None,
                     checksums: bool = False, min_tokens: int = 0) -> dict:
    """Check a split directory before training; returns its index.

    Raises :class:`DataError` for: a missing directory or ``index.json``, a missing or truncated
    shard (size != ``num_tokens * itemsize``), a vocabulary other than ``expected_vocab_size``
    (the data was tokenized with another tokenizer than the model uses), a sha256 mismatch
    (only with ``checksums=True``: it reads every byte), fewer than ``min_tokens`` tokens.
    """
    directory = Path(directory)
    index = read_index(directory)
    itemsize = np.dtype(index["dtype"]).itemsize
    if expected_vocab_size is not None and int(index["tokenizer"]["vocab_size"]) != int(expected_vocab_size):
        tok = index["tokenizer"]
        raise DataError(
            f"{directory / INDEX_FILE}: the data was tokenized with {tok['name']!r} "
            f"(vocab_size={tok['vocab_size']}) but the model/tokenizer in use has vocab_size="
            f"{expected_vocab_size}; re-run prepare with the model's tokenizer, or set the model's "
            f"vocab_size to {tok['vocab_size']}"
        )
    for shard in index["shards"]:
        path = directory / shard["file"]
        if not path.is_file():
            raise DataError(f"shard {path} listed in {INDEX_FILE} is missing; re-run prepare "
                            "into a fresh out= (or restore the file)")
        expected = shard["num_tokens"] * itemsize
        size = path.stat().st_size
        if size != expected:
            raise DataError(
                f"shard {path} is truncated or corrupt: {size} bytes, {INDEX_FILE} says "
                f"{shard['num_tokens']} tokens x {itemsize} B = {expected} bytes; re-copy it or "
                "re-run prepare into a fresh out="
            )
        vocab = int(index["tokenizer"]["vocab_size"])
        if int(shard.get("max_token_id", -1)) >= vocab:
            raise DataError(f"shard {path} holds token id {shard['max_token_id']}, outside the "
                            f"vocabulary of {vocab} ids of {INDEX_FILE}; re-run prepare with the "
                            "tokenizer the data is meant for")
        if checksums and _sha256_file(path) != shard["sha256"]:
            raise DataError(f"shard {path} fails its sha256 checksum (corrupted on disk or in "
                            "transfer); re-copy it or re-run prepare into a fresh out=")
    total = sum(s["num_tokens"] for s in index["shards"])
    if total != index["total_tokens"]:
        raise DataError(f"{directory / INDEX_FILE}: total_tokens={index['total_tokens']} but "
                        f"the shards hold {total}; re-run prepare into a fresh out=")
    if total < min_tokens:
        raise DataError(
            f"{directory} holds {total} tokens, fewer than the {min_tokens} needed for one "
            f"window (seq_len + 1); add more documents, lower seq_len, or for a val split raise "
            "prepare's val_fraction"
        )
    return index


def _sha256_file(path: Path, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


class TokenShards:
    """Read-only view of a split as one token stream, through ``np.memmap`` (RAM stays flat).

    The memmaps are opened lazily and dropped when pickled, so the object can be sent to
    DataLoader worker processes (fork or spawn) without copying data.
    """

    def __init__(self, directory: str | Path, index: dict | None = None):
        self.dir = Path(directory)
        self.index = index if index is not None else read_index(self.dir)
        self.dtype = np.dtype(self.index["dtype"]).newbyteorder("<")
        sizes = [s["num_tokens"] for s in self.index["shards"]]
        self._starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64).tolist()
        self.total_tokens = self._starts[-1]
        self.vocab_size = int(self.index["tokenizer"]["vocab_size"])
        self._maps: list[np.memmap] | None = None

    def __len__(self) -> int:
        return self.total_tokens

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_maps": None}

    def fingerprint(self) -> str:
        """Identifies the content (shard checksums), not the path."""
        return hashlib.sha256("".join(s["sha256"] for s in self.index["shards"]).encode()).hexdigest()[:16]

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """Tokens ``[start, stop)`` of the stream (a copy; may span shard boundaries)."""
        if not 0 <= start <= stop <= self.total_tokens:
            raise IndexError(f"[{start}, {stop}) out of range 0..{self.total_tokens}")
        if start == stop:
            return np.zeros(0, self.dtype)
        maps = self._open()
        i = bisect.bisect_right(self._starts, start) - 1
        parts = []
        while start < stop:
            lo, hi = start - self._starts[i], min(stop, self._starts[i + 1]) - self._starts[i]
            part = maps[i][lo:hi]
            if part.size and int(part.max()) >= self.vocab_size:
                bad = lo + int(np.argmax(part >= self.vocab_size))
                raise DataError(
                    f"shard {self.dir / self.index['shards'][i]['file']} holds token id "
                    f"{int(maps[i][bad])} at position {bad}, outside the vocabulary of "
                    f"{self.vocab_size} ids (the file is corrupted: data.checksums=true verifies "
                    "every shard at start); re-copy it or re-run prepare into a fresh out=")
            parts.append(part)
            start += hi - lo
            i += 1
        return np.concatenate(parts) if len(parts) != 1 else np.array(parts[0])

    def _open(self) -> list[np.memmap]:
        if self._maps is None:
            self._maps = [np.memmap(self.dir / s["file"], dtype=self.dtype, mode="r")
                          if s["num_tokens"] else np.zeros(0, self.dtype)
                          for s in self.index["shards"]]
        return self._maps
