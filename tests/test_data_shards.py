"""Shard format: round trip across shard boundaries, and each bad-data case has its message."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mamba_train.data.shards import (DataError, TokenShards, dtype_for_vocab, read_index,
                                     validate_dataset, write_tokens)

TOK = {"name": "test", "vocab_size": 1000, "eos_id": 0}


def _write(tmp_path, n=1000, per_shard=300, tok=TOK):
    tokens = np.arange(n) % tok["vocab_size"]
    write_tokens(tmp_path / "train", tokens, tok, tokens_per_shard=per_shard)
    return tmp_path / "train", tokens


def test_round_trip_across_shards(tmp_path):
    d, tokens = _write(tmp_path)
    index = read_index(d)
    assert [s["num_tokens"] for s in index["shards"]] == [300, 300, 300, 100]
    assert index["dtype"] == "uint16" and index["total_tokens"] == 1000
    assert (d / "shard_00000.bin").stat().st_size == 600  # raw little-endian uint16
    src = TokenShards(d)
    for start, stop in [(0, 1000), (290, 610), (299, 300), (300, 300), (950, 1000)]:
        np.testing.assert_array_equal(src.tokens(start, stop), tokens[start:stop])
    assert validate_dataset(d, expected_vocab_size=1000, checksums=True, min_tokens=1000)
    assert dtype_for_vocab(65536) == "uint16" and dtype_for_vocab(65537) == "uint32"


def test_missing_dir_and_index(tmp_path):
    with pytest.raises(DataError, match="does not exist.*prepare"):
        validate_dataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="index.json is missing"):
        validate_dataset(tmp_path / "empty")


def test_missing_shard(tmp_path):
    d, _ = _write(tmp_path)
    (d / "shard_00002.bin").unlink()
    with pytest.raises(DataError, match="shard_00002.bin listed in index.json is missing"):
        validate_dataset(d)


def test_truncated_shard(tmp_path):
    d, _ = _write(tmp_path)
    with open(d / "shard_00001.bin", "r+b") as f:
        f.truncate(599)
    with pytest.raises(DataError, match=r"shard_00001.bin is truncated or corrupt: 599 bytes.*600 bytes"):
        validate_dataset(d)


def test_corrupted_checksum(tmp_path):
    d, _ = _write(tmp_path)
    with open(d / "shard_00003.bin", "r+b") as f:
        f.seek(10)
        f.write(b"\xff")
    validate_dataset(d)  # sizes are fine, checksums are opt-in
    with pytest.raises(DataError, match="shard_00003.bin fails its sha256 checksum"):
        validate_dataset(d, checksums=True)


def test_other_vocab(tmp_path):
    d, _ = _write(tmp_path)
    with pytest.raises(DataError, match=r"tokenized with 'test' \(vocab_size=1000\).*vocab_size=50277"):
        validate_dataset(d, expected_vocab_size=50277)


def test_too_few_tokens(tmp_path):
    d, _ = _write(tmp_path, n=100)
    with pytest.raises(DataError, match=f"{d} holds 100 tokens, fewer than the 2049"):
        validate_dataset(d, min_tokens=2049)


def test_bad_format_version(tmp_path):
    d, _ = _write(tmp_path)
    index = json.loads((d / "index.json").read_text())
    (d / "index.json").write_text(json.dumps({**index, "format_version": 99}))
    with pytest.raises(DataError, match="format_version 99"):
        validate_dataset(d)


def test_uint32_for_large_vocab(tmp_path):
    tok = {"name": "big", "vocab_size": 100_000, "eos_id": 0}
    tokens = np.array([99_999, 0, 70_000, 5])
    index = write_tokens(tmp_path / "t", tokens, tok, tokens_per_shard=3)
    assert index["dtype"] == "uint32"
    np.testing.assert_array_equal(TokenShards(tmp_path / "t").tokens(0, 4), tokens)
