"""The embedded corpus and the bundled default tokenizer."""

from __future__ import annotations

import pytest

from mamba_train.data.default_corpus import default_documents, default_split, is_val_document
from mamba_train.data.tokenizer import eos_id, load_backend, load_tokenizer, vocab_size


def test_default_corpus_is_deterministic_and_split():
    docs = default_documents()
    assert len(docs) > 50 and sum(map(len, docs)) > 300_000
    assert docs == default_documents()
    train, val = default_split("train"), default_split("val")
    assert len(train) + len(val) == len(docs)
    assert 0.05 < sum(map(len, val)) / sum(map(len, docs)) < 0.15
    assert val == [d for i, d in enumerate(docs) if is_val_document(i)]
    with pytest.raises(ValueError):
        default_split("test")


def test_default_tokenizer_offline():
    tok = load_tokenizer(None)
    assert vocab_size(tok) == 4096 and eos_id(tok) == 0 and tok.eos_token == "<|endoftext|>"
    text = default_split("val")[0]
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text and len(ids) < len(text) / 2.5  # it compresses English
    assert load_tokenizer("default").get_vocab() == tok.get_vocab()
    backend, info = load_backend("default")
    assert info == {"name": "default", "vocab_size": 4096, "eos_id": 0}
    assert backend.encode(text, add_special_tokens=False).ids == ids


def test_tokenizer_file_and_missing_path(tmp_path):
    from mamba_train.data.tokenizer import DEFAULT_TOKENIZER_DIR

    tok = load_tokenizer(DEFAULT_TOKENIZER_DIR / "tokenizer.json")
    assert vocab_size(tok) == 4096 and eos_id(tok) == 0
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_tokenizer(str(tmp_path / "nope"))
