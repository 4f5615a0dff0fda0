"""Data layer: tokenizer, pre-tokenized token shards, streaming windows, exact resume."""
