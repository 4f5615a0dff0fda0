"""Data layer: tokenizer, pre-tokenized token shards, streaming windows with exact resume.

* ``tokenizer``      -- ``load_tokenizer`` (bundled default / local / hub), ``eos_id``, ``vocab_size``
* ``default_corpus`` -- the embedded default text (Python's ``pydoc_data`` topics)
* ``shards``         -- on-disk format: ``ShardWriter``, ``TokenShards``, ``validate_dataset``, ``DataError``
* ``prepare``        -- ``python -m mamba_train.data.prepare source=... out=...``
* ``sampling``       -- the integer maths of the order: ``FeistelPermutation``, ``MixSchedule``, ``mix64``
* ``dataset``        -- ``TokenWindowDataset``, ``ValWindowDataset`` (windows of token shards)
* ``loader``         -- ``ResumableDataLoader`` (the train loader; its state is the sample count)
* ``datamodule``     -- ``TokenDataModule`` (the Hydra ``data`` target)

Names are imported lazily so that ``prepare`` (and its worker processes) do not pay for
importing torch and Lightning.
"""

from importlib import import_module

_EXPORTS = {
    "load_tokenizer": "tokenizer", "eos_id": "tokenizer", "vocab_size": "tokenizer",
    "default_documents": "default_corpus", "default_split": "default_corpus",
    "DataError": "shards", "ShardWriter": "shards", "TokenShards": "shards",
    "validate_dataset": "shards", "read_index": "shards", "write_tokens": "shards",
    "PrepareConfig": "prepare",
    "FeistelPermutation": "sampling", "MixSchedule": "sampling",
    "TokenWindowDataset": "dataset", "ValWindowDataset": "dataset", "ResumableDataLoader": "loader",
    "TokenDataModule": "datamodule", "ensure_default_data": "datamodule",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
