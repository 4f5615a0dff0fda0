"""The embedded default corpus: real English prose that ships with every Python install.

``pydoc_data.topics.topics`` is the text behind ``help("assert")`` & co.: ~80 documents
(~465 KB) of the Python language reference. It is the default training text so that a fresh
checkout can tokenize, train and validate end to end with no download and no data path: it is
tiny (~113k tokens with the default tokenizer), so it is for smoke tests and tutorials, not
for models worth keeping.

Determinism: documents are ordered by their topic key. The validation split is length
stratified: rank the documents by length (longest first, ties by key) and hold out every
``VAL_EVERY``-th one (ranks 4, 14, 24, ...), about 9% of the text; a split by key order would
put anywhere between 2% and 18% of the text in validation, as document sizes vary 100-fold.
(~101k train tokens and ~12k val tokens with the default tokenizer on Python 3.11.)

Python 3.11 and 3.12 ship slightly different text, so shards (and their checksums) built on
different Python versions differ; the default data cache is keyed by a hash of the text, so
each interpreter gets its own.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache

VAL_EVERY = 10
VAL_OFFSET = 4


def default_documents() -> list[str]:
    """All documents, sorted by topic key."""
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


def default_split(split: str) -> list[str]:
    """The fixed ``"train"`` or ``"val"`` documents, in key order."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    return [d for i, d in enumerate(default_documents()) if is_val_document(i) == (split == "val")]


def is_val_document(position: int) -> bool:
    """Whether the document at ``position`` of :func:`default_documents` is held out."""
    return position in _val_positions()


@lru_cache(maxsize=1)
def _val_positions() -> frozenset[int]:
    docs = default_documents()
    by_length = sorted(range(len(docs)), key=lambda i: (-len(docs[i]), i))
    return frozenset(i for rank, i in enumerate(by_length) if rank % VAL_EVERY == VAL_OFFSET)


def default_corpus_hash() -> str:
    """Short content hash of the corpus (differs between Python versions)."""
    h = hashlib.sha256()
    for doc in default_documents():
        h.update(doc.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()[:16]
