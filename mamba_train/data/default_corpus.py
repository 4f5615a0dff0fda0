"""The embedded default corpus: real English prose that ships with every Python install.

``pydoc_data.topics.topics`` is the text behind ``help("assert")`` & co.: ~80 documents
(~465 KB) of the Python language reference. It is the default training text so that a fresh
checkout can tokenize, train and validate end to end with no download and no data path: it is
tiny (~120k tokens with the default tokenizer), so it is for smoke tests and tutorials, not
for models worth keeping.

Determinism: documents are ordered by their topic key, and every ``VAL_EVERY``-th document
(positions 9, 19, ...) is held out for validation. Python 3.11 and 3.12 ship slightly different
text, so shards (and their checksums) built on different Python versions differ; the default
data cache is keyed by a hash of the text, so each interpreter gets its own.
"""

from __future__ import annotations

import hashlib

VAL_EVERY = 10
SOURCE_NAME = "default"


def default_documents() -> list[str]:
    """All documents, sorted by topic key."""
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


def default_split(split: str) -> list[str]:
    """The fixed ``"train"`` or ``"val"`` documents (every ``VAL_EVERY``-th one is val)."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    want_val = split == "val"
    return [d for i, d in enumerate(default_documents()) if (i % VAL_EVERY == VAL_EVERY - 1) == want_val]


def is_val_document(position: int) -> bool:
    """Whether the document at ``position`` of :func:`default_documents` is held out."""
    return position % VAL_EVERY == VAL_EVERY - 1


def default_corpus_hash() -> str:
    """Short content hash of the corpus (differs between Python versions)."""
    h = hashlib.sha256()
    for doc in default_documents():
        h.update(doc.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()[:16]
