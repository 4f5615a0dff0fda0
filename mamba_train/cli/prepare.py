"""``mamba-train-prepare`` / ``python -m mamba_train.data.prepare``: tokenize a corpus into token
shards. The arguments are :class:`~mamba_train.data.prepare.PrepareConfig`'s fields; what the
command does is :mod:`mamba_train.data.prepare`'s (``--help`` prints its description)."""

from __future__ import annotations

import sys

from mamba_train.cli.args import UsageError, parse_key_values, wants_help
from mamba_train.data import prepare as prepare_module
from mamba_train.data.prepare import PrepareConfig, prepare
from mamba_train.errors import MambaTrainError

USAGE = ("usage: mamba-train-prepare (or python -m mamba_train.data.prepare) source=<file|glob|dir|hub-name|default> "
         "out=<dir> [key=value ...] (--help)")


def parse_args(argv: list[str]) -> PrepareConfig:
    """``key=value`` arguments -> :class:`PrepareConfig` (typed by the dataclass fields)."""
    cfg = parse_key_values(argv, PrepareConfig, required=("source", "out"), usage=USAGE)
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise UsageError(f"val_fraction must be in [0, 1), got {cfg.val_fraction}")
    if cfg.min_val_tokens < 0:
        raise UsageError(f"min_val_tokens must be >= 0, got {cfg.min_val_tokens}")
    for name in ("num_proc", "tokens_per_shard", "batch_docs", "max_shards"):
        value = getattr(cfg, name)
        if not (value is None and name == "max_shards") and value < 1:
            raise UsageError(f"{name} must be >= 1, got {value}")
    return cfg


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if wants_help(argv):
        print(USAGE)
        print(prepare_module.__doc__)
        return 0
    try:
        prepare(parse_args(argv))
    except MambaTrainError as e:  # DataError, UsageError, ...
        print(f"prepare: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
