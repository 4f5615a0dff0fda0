"""Where ``prepare`` reads records from. Local ``.jsonl`` / ``.json`` / ``.txt`` files (optionally
``.zst`` / ``.gz`` / ``.bz2`` / ``.xz``) are read with the standard library and ``zstandard``: the
common inputs need no ``datasets`` (with pyarrow and pandas, ~270 MB); parquet files and hub
datasets still go through it (the ``datasets`` extra).

Streaming, in file order: memory stays flat for any file size, as with ``datasets``' streaming
mode. A JSON file is either JSON Lines (one object per line) or one top-level array of objects.
"""

from __future__ import annotations

import bz2
import glob as globlib
import gzip
import io
import json
import lzma
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

from mamba_train.data.shards import DataError

_BUILDERS = {  # file suffix -> datasets builder
    ".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text",
}
_COMPRESSION = (".zst", ".gz", ".bz2", ".xz")


@contextmanager
def open_decompressed(path: str) -> Iterator[IO[bytes]]:
    name = path.lower()
    if name.endswith(".zst"):
        import zstandard

        with open(path, "rb") as raw, zstandard.ZstdDecompressor().stream_reader(raw) as f:
            yield f
        return
    opener = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}.get(name[name.rfind("."):], open)
    with opener(path, "rb") as f:
        yield f


def _not_utf8(source: str, e: UnicodeDecodeError) -> DataError:
    return DataError(f"source {source!r} is not valid UTF-8 text ({e.reason} at byte {e.start}); "
                     "re-encode it as UTF-8 (e.g. iconv -f latin1 -t utf-8)")


def _records(f: IO[bytes], path: str, source: str) -> Iterator[object]:
    text = io.TextIOWrapper(f, encoding="utf-8")
    for line_no, line in enumerate(text, 1):
        if not line.strip():
            continue
        if line_no == 1 and line.lstrip().startswith("["):  # one top-level array
            line, line_no = line + text.read(), 0
        try:
            record = json.loads(line)
        except ValueError as e:
            where = f"line {line_no}: " if line_no else ""
            raise DataError(f"source {source!r}: cannot parse it ({path}, {where}{e}); every line "
                            "of a .jsonl file must be one JSON object") from None
        yield from record if isinstance(record, list) else [record]


def read_local(builder: str, files: list[str], source: str) -> Iterator[dict]:
    """Records (dicts) of ``files``; ``builder``: ``json`` or ``text`` (one document per file,
    under the key ``text``). Undecodable or unparsable input is one :class:`DataError`."""
    for path in files:
        with open_decompressed(path) as f:
            try:
                if builder == "text":
                    yield {"text": f.read().decode("utf-8")}
                    continue
                for record in _records(f, path, source):
                    if not isinstance(record, dict):
                        raise DataError(f"source {source!r}: {path} holds a {type(record).__name__} "
                                        "where a JSON object with a text field was expected")
                    yield record
            except UnicodeDecodeError as e:
                raise _not_utf8(source, e) from None


def hf_dataset(source: str, resolved: tuple[str, list[str]] | None, config: str | None = None,
               split: str = "train"):
    """A streaming ``datasets`` dataset for a hub name or parquet files (None: no records)."""
    try:
        import datasets
    except ImportError:
        what = "a hub dataset" if resolved is None else "parquet files"
        raise DataError(f"source {source!r}: reading {what} needs the datasets package: "
                        "pip install 'mamba_train[datasets]' (.jsonl, .json and .txt files need "
                        "nothing more)") from None
    datasets.disable_progress_bars()
    # errors reach the user as one DataError line (below), not also as datasets log records
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        if resolved is None:
            return datasets.load_dataset(source, config, split=split,
                                         streaming=True)
        return datasets.load_dataset(resolved[0], data_files=resolved[1], split="train",
                                     streaming=True)
    except StopIteration:  # datasets' schema inference on files with no records
        return None
    except (FileNotFoundError, ConnectionError, OSError, ValueError) as e:
        raise DataError(f"source {source!r}: could not open it with `datasets` "
                        f"({e.__class__.__name__}: {e}). For a hub dataset without internet, "
                        "download it elsewhere and pass the local files") from e


def readable(records, source: str):
    """The records, with a file that is not valid UTF-8 / JSON reported as a DataError."""
    it = iter(records)
    while True:
        try:
            record = next(it)
        except StopIteration:
            return
        except UnicodeDecodeError as e:
            raise DataError(f"source {source!r} is not valid UTF-8 text ({e.reason} at byte "
                            f"{e.start}); re-encode it as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None
        except ValueError as e:  # pyarrow's ArrowInvalid: a JSON line that does not parse
            first = (str(e).splitlines() or [type(e).__name__])[0]
            raise DataError(f"source {source!r}: cannot parse it ({first}); every line of a "
                            ".jsonl file must be one JSON object") from None
        yield record


def _builder(path: Path) -> str | None:
    name = path.name.lower()
    for comp in _COMPRESSION:
        if name.endswith(comp):
            name = name[: -len(comp)]
    return _BUILDERS.get(Path(name).suffix)


def resolve_files(source: str) -> tuple[str, list[str]] | None:
    """``(builder, files)`` for a local source, ``None`` for a hub name; raises if missing."""
    path = Path(source).expanduser()
    if any(c in source for c in "*?["):
        files = sorted(p for p in globlib.glob(str(path), recursive=True) if Path(p).is_file())
        if not files:
            raise DataError(f"source {source!r}: no file matches this glob")
    elif path.is_dir():
        files = sorted(str(p) for p in path.rglob("*") if p.is_file() and _builder(p))
        if not files:
            raise DataError(f"source {source!r} is a directory without .jsonl/.json/.parquet/"
                            ".txt files (optionally .zst/.gz compressed)")
    elif path.is_file():
        files = [str(path)]
    elif source.startswith((".", "/", "~")) or _builder(path) or source.count("/") != 1:
        raise DataError(f"source {source!r} not found (no such file, directory or glob match; "
                        "a hub dataset name looks like 'org/name')")
    else:
        return None
    builders = {_builder(Path(f)) for f in files}
    if None in builders:
        bad = next(f for f in files if _builder(Path(f)) is None)
        raise DataError(f"source {source!r}: cannot read {bad}; supported: .jsonl .json .parquet "
                        ".txt, optionally compressed .zst .gz .bz2 .xz")
    if len(builders) > 1:
        raise DataError(f"source {source!r} mixes formats {sorted(builders)}; prepare one at a time")
    return builders.pop(), files
