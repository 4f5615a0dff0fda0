"""Tokenize a text corpus once into train/val token shards (see ``shards.py`` for the format).

Usage::

    mamba-train-prepare source=<file|glob|dir|hub-name|default> out=<dir> \\
        [tokenizer=default] [text_key=text] [tokens_per_shard=33554432] [num_proc=N] \\
        [val_fraction=0.01] [min_val_tokens=2049] [source_config=NAME] [source_split=train] \\
        [max_shards=N]

* ``source``: ``.jsonl``/``.json`` (optionally ``.zst``/``.gz``), ``.parquet`` (records with a
  ``text_key`` field) or ``.txt`` (one document per file); a directory (all such files inside,
  recursively) or a glob; a Hugging Face hub dataset name; ``default`` for the embedded corpus.
  Files are streamed (memory stays flat for any size): JSON and text with the standard library
  (``data/readers.py``), parquet files and hub datasets with ``datasets`` (the ``datasets`` extra).
* Writes ``out/train`` and ``out/val``. A document goes to val when a hash of its text falls
  below ``val_fraction``: deterministic, independent of order and ``num_proc``, and duplicates
  land in the same split. (``source=default`` uses the corpus' own fixed split.) So that a small
  corpus still validates, the source's first documents go to val until it holds
  ``min_val_tokens`` (default 2049: one 2048-token window and its last target; raise it to
  ``data.val_seq_len + 1`` for longer windows, 0 turns it off); ``val_fraction=0`` writes no
  val split at all (train with ``trainer.limit_val_batches=0``).
* Every document is followed by the tokenizer's EOS id. ``num_proc`` worker processes tokenize
  batches of documents; results are consumed in order, so the output is identical for any
  ``num_proc``.
* Resumable: ``out/progress.json`` records, after every shard, the shards written and the
  document from which to restart (plus how many of its tokens are already written). Re-running
  the same command skips what is done (the documents before that point are read, not
  tokenized); a finished ``out`` is left untouched. ``max_shards`` stops a run after that many
  new shards (chunked jobs, tests).
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass, replace
from itertools import islice
from pathlib import Path
from typing import Iterator

import numpy as np

from mamba_train.data.prepare_console import progress_display
from mamba_train.data.readers import hf_dataset, read_local, readable, resolve_files
from mamba_train.data.shards import (FORMAT_VERSION, DataError, ShardWriter, atomic_write_json,
                                     is_fresh_output, locked_output)
from mamba_train.data.tokenizer import load_backend

PROGRESS_FILE = "progress.json"
SPLITS = ("train", "val")


@dataclass
class PrepareConfig:
    source: str
    out: str
    tokenizer: str = "default"
    text_key: str = "text"
    tokens_per_shard: int = 1 << 25  # 64 MiB of uint16
    num_proc: int = max(1, min(8, (os.cpu_count() or 2) - 1))
    val_fraction: float = 0.01
    min_val_tokens: int = 2049
    source_config: str | None = None
    source_split: str = "train"
    batch_docs: int = 512
    max_shards: int | None = None

    def identity(self) -> dict:
        """The settings that determine the output (a resumed run must use the same)."""
        skip = {"out", "num_proc", "batch_docs", "max_shards"}
        return {k: v for k, v in asdict(self).items() if k not in skip}


def _refuse_foreign_output(out: Path) -> None:
    """``out`` is new, empty, or a prepare output (its progress file): never anyone else's."""
    if out.exists() and not out.is_dir():
        raise DataError(f"out={out} is a file; give a directory to write the shards into")
    if out.is_dir() and not (out / PROGRESS_FILE).is_file() and not is_fresh_output(out, SPLITS):
        raise DataError(f"out={out} exists, is not empty and has no {PROGRESS_FILE}: it is not "
                        "a prepare output; choose another out= or empty it")


# ----------------------------------------------------------------------------- reading sources
def iter_documents(cfg: PrepareConfig) -> Iterator[str]:
    """The source's non-empty document texts, in a deterministic order."""
    if cfg.source == "default":
        from mamba_train.data.default_corpus import default_documents

        yield from default_documents()
        return
    resolved = resolve_files(cfg.source)
    if resolved is not None and resolved[0] in ("json", "text"):
        records = read_local(*resolved, cfg.source)
    else:
        ds = hf_dataset(cfg.source, resolved, cfg.source_config, cfg.source_split)
        if ds is None:
            return
        records = readable(ds, cfg.source)
    text_key = "text" if resolved is not None and resolved[0] == "text" else cfg.text_key
    for record in records:
        if text_key not in record:
            raise DataError(f"source {cfg.source!r}: records have no {text_key!r} field; fields "
                            f"present: {sorted(record)}. Pass text_key=<one of them>")
        text = record[text_key]
        if not isinstance(text, str):
            raise DataError(f"source {cfg.source!r}: field {text_key!r} holds "
                            f"{type(text).__name__}, not text")
        if text:
            yield text


# ----------------------------------------------------------------------------- tokenizing
_WORKER: dict = {}


def _init_worker(tokenizer_json: str, eos: int, val_fraction: float, by_position: bool) -> None:
    from tokenizers import Tokenizer

    _WORKER.update(tok=Tokenizer.from_str(tokenizer_json), eos=eos, val_fraction=val_fraction,
                   by_position=by_position)


def _encode_batch(first: int, texts: list[str]) -> tuple[int, list[bool], list[np.ndarray]]:
    """Worker: ``(first, is_val flags, token arrays with EOS appended)``."""
    w = _WORKER
    encodings = w["tok"].encode_batch(texts, add_special_tokens=False)
    arrays = [np.array(e.ids + [w["eos"]], dtype=np.uint32) for e in encodings]
    if w["by_position"]:
        from mamba_train.data.default_corpus import is_val_document

        is_val = [is_val_document(first + k) for k in range(len(texts))]
    else:
        is_val = [_hash_fraction(t) < w["val_fraction"] for t in texts]
    return first, is_val, arrays


def _hash_fraction(text: str) -> float:
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64


def _encoded_batches(cfg: PrepareConfig, docs: Iterator[str], first: int, init_args: tuple):
    """Ordered results of ``_encode_batch`` over ``docs``, with a bounded number in flight."""
    batches = ((first + i * cfg.batch_docs, batch) for i, batch in
               enumerate(iter(lambda: list(islice(docs, cfg.batch_docs)), [])))
    if cfg.num_proc <= 1:
        _init_worker(*init_args)  # in-process; the Rust tokenizer still uses threads
        for start, batch in batches:
            yield _encode_batch(start, batch)
        return
    import multiprocessing as mp

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one thread per worker process
    with mp.get_context("spawn").Pool(cfg.num_proc, _init_worker, init_args) as pool:
        inflight: deque = deque()
        for start, batch in batches:
            inflight.append(pool.apply_async(_encode_batch, (start, batch)))
            if len(inflight) >= 2 * cfg.num_proc:
                yield inflight.popleft().get()
        while inflight:
            yield inflight.popleft().get()


# ----------------------------------------------------------------------------- the run
class _SplitProgress:
    """A split's writer plus where to restart: the first document not completely in shards."""

    def __init__(self, writer: ShardWriter, saved: dict):
        self.writer = writer
        self.documents = saved.get("documents", 0)
        self.resume_doc = saved.get("resume_doc", 0)
        self.head_skip = saved.get("head_skip", 0)
        self.pending: deque[list[int]] = deque()  # [doc index, tokens] of docs in the buffer
        self.pending_tokens = 0

    def add(self, doc: int, tokens: np.ndarray) -> int:
        """Append document ``doc`` (unless a previous run wrote it); returns shards written."""
        if doc < self.resume_doc:
            return 0
        self.documents += 1
        # pending counts whole documents: the head a previous run wrote counts as written, so
        # ``state`` still skips it if this run stops before the document's end reaches a shard
        self.pending.append([doc, len(tokens)])
        self.pending_tokens += len(tokens)
        if doc == self.resume_doc and self.head_skip:
            tokens = tokens[self.head_skip:]
        written = self.writer.add(tokens)
        while self.pending and self.pending_tokens - self.pending[0][1] >= self.writer.buffered:
            self.pending_tokens -= self.pending.popleft()[1]  # completely in shards now
        return written

    def state(self, docs_consumed: int) -> dict:
        if self.pending:
            resume_doc, head_skip = self.pending[0][0], self.pending_tokens - self.writer.buffered
        else:
            resume_doc, head_skip = docs_consumed, 0
        # documents completely written; the pending ones are added (and counted) again on resume
        return {**self.writer.state(), "resume_doc": resume_doc, "head_skip": head_skip,
                "documents": self.documents - len(self.pending)}


def prepare(cfg: PrepareConfig, console=None, final_dir: str | Path | None = None) -> dict:
    """Run (or resume) a prepare; returns ``progress.json``'s content.

    ``final_dir``: where the caller moves ``cfg.out`` afterwards (a build in a temporary
    directory); the messages name it instead of the temporary one."""
    if cfg.source != "default":
        resolve_files(cfg.source)  # fail fast on a missing source
    _refuse_foreign_output(Path(cfg.out).expanduser())  # before the lock file goes into it
    with locked_output(Path(cfg.out).expanduser()):  # one prepare per out=
        return _prepare(cfg, console, final_dir)


def _prepare(cfg: PrepareConfig, console, final_dir: str | Path | None) -> dict:
    from rich.console import Console

    console = console or Console(stderr=True, soft_wrap=True)
    out = Path(cfg.out).expanduser()
    backend, tok_info = load_backend(cfg.tokenizer)
    identity = {**cfg.identity(), "tokenizer": tok_info, "format_version": FORMAT_VERSION}
    if cfg.source != "default" and Path(cfg.source).expanduser().exists():
        identity["source"] = str(Path(cfg.source).expanduser().resolve())
    saved = _load_progress(out, identity)
    if saved and "min_val_tokens" not in saved.get("identity", {}):  # an older version's output
        cfg = replace(cfg, min_val_tokens=0)
        identity.pop("min_val_tokens")
    if saved.get("done"):
        console.print(f"[green]{out} is already complete[/] ({_summary(saved)}); nothing to do")
        return saved

    splits = {s: _SplitProgress(ShardWriter(out / s, cfg.tokens_per_shard, tok_info, s, [cfg.source],
                                            state=saved.get("splits", {}).get(s)),
                                saved.get("splits", {}).get(s, {})) for s in SPLITS}
    start_doc = min(p.resume_doc for p in splits.values())
    docs_consumed, new_shards, t0 = start_doc, 0, time.time()
    tokens_before = sum(p.writer.tokens_written for p in splits.values())
    state = dict(saved, identity=identity, done=False)

    def save() -> None:
        state["docs_consumed"] = docs_consumed
        state["splits"] = {s: p.state(docs_consumed) for s, p in splits.items()}
        atomic_write_json(out / PROGRESS_FILE, state)

    head = _ValHead(cfg, saved.get("val_head_docs"), splits["val"])
    docs = iter_documents(cfg)
    if start_doc:
        console.print(f"resuming {out}: {start_doc:,} documents done, skipping them")
        for _ in islice(docs, start_doc):
            pass
    init_args = (backend.to_str(), tok_info["eos_id"], cfg.val_fraction,
                 cfg.source == "default")
    batches = _encoded_batches(cfg, docs, start_doc, init_args)
    with progress_display(console) as bar:
        task = bar.add_task(f"tokenizing {cfg.source} into {final_dir or out}", total=None, docs=0, tokens=0, rate=0.0)
        try:
            for first, is_val, arrays in batches:
                for k, (val, tokens) in enumerate(zip(is_val, arrays)):
                    val = head.is_val(first + k, len(tokens), val)
                    if head.docs is not None:
                        state["val_head_docs"] = head.docs
                    written = splits["val" if val else "train"].add(first + k, tokens)
                    docs_consumed = first + k + 1
                    if written:
                        save()
                        new_shards += written
                total = sum(p.writer.tokens_written + p.writer.buffered for p in splits.values())
                rate = (total - tokens_before) / max(time.time() - t0, 1e-9)
                bar.update(task, docs=docs_consumed, tokens=total, rate=rate)
                if cfg.max_shards is not None and new_shards >= cfg.max_shards:
                    console.print(f"stopped after {new_shards} new shards (max_shards); re-run to continue")
                    return state
        finally:
            batches.close()  # stops the worker pool
    if docs_consumed == 0:
        out.joinpath(PROGRESS_FILE).unlink(missing_ok=True)
        raise DataError(f"source {cfg.source!r} has no documents (no records, or all "
                        f"{cfg.text_key!r} fields empty)")
    for p in splits.values():
        p.pending.clear()
        p.pending_tokens = 0
        p.writer.finish()
    state["done"] = True
    save()
    console.print(f"[green]wrote {final_dir or out}[/]: {_summary(state)} in {time.time() - t0:.1f}s")
    if state["splits"]["val"]["documents"] == 0:
        console.print("no val split (val_fraction=0): train with trainer.limit_val_batches=0")
    return state


class _ValHead:
    """The source's first documents go to val until it holds ``min_val_tokens``: a corpus of
    a few hundred documents would otherwise get a val split shorter than one window. ``docs``:
    how many documents the head took, once full (saved in progress.json); until then the
    tokens so far are counted from the val split itself (all of it is head), so a resumed run
    decides as the first did."""

    def __init__(self, cfg: PrepareConfig, docs: int | None, val: "_SplitProgress"):
        self.on = cfg.min_val_tokens > 0 and cfg.val_fraction > 0 and cfg.source != "default"
        self.min_tokens, self.docs = cfg.min_val_tokens, docs
        self.tokens = val.writer.tokens_written - val.head_skip if self.on and docs is None else 0

    def is_val(self, doc: int, n_tokens: int, by_hash: bool) -> bool:
        if not self.on:
            return by_hash
        if self.docs is None:
            self.tokens += n_tokens
            if self.tokens >= self.min_tokens:
                self.docs = doc + 1
            return True
        return doc < self.docs or by_hash


def _load_progress(out: Path, identity: dict) -> dict:
    import json

    path = out / PROGRESS_FILE
    if not path.is_file():
        _refuse_foreign_output(out)
        out.mkdir(parents=True, exist_ok=True)
        return {}
    saved = json.loads(path.read_text())
    if "min_val_tokens" not in saved.get("identity", {}):  # written before the val head existed
        identity = {k: v for k, v in identity.items() if k != "min_val_tokens"}
    if saved.get("identity") != identity:
        diff = {k: (saved.get("identity", {}).get(k), v) for k, v in identity.items()
                if saved.get("identity", {}).get(k) != v}
        raise DataError(f"out={out} holds a prepare run with other settings (saved, now): {diff}; "
                        "use another out= or delete it")
    for split, st in saved.get("splits", {}).items():
        for shard in st["shards"]:
            f = out / split / shard["file"]
            if not f.is_file():
                raise DataError(f"{f} recorded in {path} is missing; delete {out} and start over")
    return saved


def _summary(state: dict) -> str:
    parts = []
    for s, st in state.get("splits", {}).items():
        n = sum(x["num_tokens"] for x in st["shards"])
        parts.append(f"{s}: {st['documents']:,} docs, {n:,} tokens, {len(st['shards'])} shards")
    return "; ".join(parts)


if __name__ == "__main__":  # python -m mamba_train.data.prepare
    from mamba_train.cli.prepare import main

    sys.exit(main())
