"""Settings the prepared data already knows: its tokenizer and vocabulary.

``prepare`` records the tokenizer (name or absolute path), its vocabulary size and EOS id in
every split's ``index.json``. A run on that data must use the same, so :func:`adopt_data_tokenizer`
takes ``data.tokenizer`` and ``model.vocab_size`` from the index unless the command line set
them; when it did and they disagree, one error names both keys and the values to set. Without
this, a corpus prepared with its own tokenizer needs two failed runs (vocabulary, then
tokenizer) to find the two keys.
"""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from mamba_train.errors import MambaTrainError

KEYS = ("data.tokenizer", "model.vocab_size")


class DataTokenizerMismatch(MambaTrainError, ValueError):
    pass


def task_overrides() -> list[str]:
    """The command line's overrides as typed: Hydra keeps them in a ListConfig, where reading
    ``data.tokenizer=${oc.env:X}`` would resolve the ``${...}`` (and raise for an unset
    variable before the config's own check can name the key)."""
    from hydra.core.hydra_config import HydraConfig

    return list(OmegaConf.to_container(HydraConfig.get().overrides.task, resolve=False))


def _data_index(cfg: DictConfig) -> tuple[Path, dict] | None:
    """The first training source's ``train/index.json`` and its content (None: no prepared
    directory, e.g. the embedded corpus, or one that does not exist: the datamodule says so)."""
    path = OmegaConf.select(cfg, "data.path", default=None)
    sources = OmegaConf.select(cfg, "data.sources", default=None)
    if path is None and sources:
        path = sources[0].get("path") if hasattr(sources[0], "get") else None
    if path is None:
        return None
    index = Path(str(path)).expanduser() / "train" / "index.json"
    try:
        return index, json.loads(index.read_text())
    except (OSError, ValueError):
        return None


def adopt_data_tokenizer(cfg: DictConfig, explicit: set[str] | frozenset[str] = frozenset()) -> str | None:
    """Set ``data.tokenizer`` / ``model.vocab_size`` from the data where ``explicit`` (keys the
    command line set) leaves them free; returns a line saying what was taken (None: nothing).
    With ``init_from`` the vocabulary comes from the source model, so only the tokenizer is taken."""
    found = _data_index(cfg)
    if found is None:
        return None
    index_path, index = found
    tok = index.get("tokenizer") or {}
    if "name" not in tok or "vocab_size" not in tok:
        return None
    want = {"data.tokenizer": str(tok["name"]), "model.vocab_size": int(tok["vocab_size"])}
    if OmegaConf.select(cfg, "init_from", default=None):
        want.pop("model.vocab_size")
    have = {k: OmegaConf.select(cfg, k, default=None) for k in want}
    if have.get("data.tokenizer") is None:  # data.tokenizer=null: the run skips the check
        want.pop("data.tokenizer")
    differ = [k for k in want if have[k] != want[k] and not _same_tokenizer(k, have[k], want[k])]
    if not differ:
        return None
    refused = [k for k in differ if k in explicit]
    if refused:
        raise DataTokenizerMismatch(
            f"{index_path} was tokenized with {tok['name']!r} (vocab_size {tok['vocab_size']}, "
            f"eos_id {tok.get('eos_id')}) but the command line sets "
            + ", ".join(f"{k}={have[k]}" for k in refused)
            + "; set " + " ".join(f"{k}={want[k]}" for k in want)
            + " (or leave them out: they are read from the data), or re-run prepare with the "
            "tokenizer you want")
    for k in differ:
        OmegaConf.update(cfg, k, want[k], merge=False)
    return (f"from the data ({index_path}): " + " ".join(f"{k}={want[k]}" for k in differ)
            + f" (was {', '.join(repr(have[k]) for k in differ)})")


def _same_tokenizer(key: str, have, want) -> bool:
    if key != "data.tokenizer" or have is None:
        return False
    from mamba_train.data.tokenizer import tokenizer_name

    return tokenizer_name(have) == want


def explicit_keys(overrides: list[str]) -> set[str]:
    """The keys of ``KEYS`` a list of Hydra overrides sets."""
    keys = {o.split("=", 1)[0].lstrip("+~") for o in overrides if "=" in o}
    return {k for k in KEYS if k in keys}
