"""Tokenizer loading: the bundled default, a local file/directory, or a Hugging Face hub name.

Everything downstream (prepare, the data index, the model's ``vocab_size``) only needs a *fast*
HF tokenizer, its vocabulary size (``len(tokenizer)``, which counts added special tokens, the
number the embedding must cover) and its end-of-document id. The default is a 4096-entry
byte-level BPE bundled in ``mamba_train/assets/tokenizer`` (see
``scripts/build_default_tokenizer.py``) so that nothing needs the network.
"""

from __future__ import annotations

import json
from pathlib import Path

from mamba_train.errors import MambaTrainError

DEFAULT_TOKENIZER_DIR = Path(__file__).resolve().parents[1] / "assets" / "tokenizer"
DEFAULT_EOS = "<|endoftext|>"


class TokenizerError(MambaTrainError, ValueError):
    """A tokenizer that cannot be used; the message says which and what to use instead."""


class TokenizerNotFoundError(MambaTrainError, FileNotFoundError):
    """No such tokenizer file/directory, or the hub has none (or is out of reach)."""


def _auto_tokenizer(name: str):
    """``AutoTokenizer.from_pretrained``, refusing a tokenizer that needs its repository's own
    Python code (``trust_remote_code``): mamba_train never runs code that comes with data."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name, use_fast=True)
    except ValueError as e:
        if "trust_remote_code" not in str(e):
            raise
        raise TokenizerError(
            f"tokenizer {name!r} needs to run its repository's own Python code "
            "(trust_remote_code), which mamba_train never does; use a tokenizer that ships a "
            "tokenizer.json (pass that file), or one of the standard ones") from None


def load_tokenizer(name_or_path: str | Path | None = None):
    """A ``transformers`` fast tokenizer.

    Args:
        name_or_path: ``None`` or ``"default"`` for the bundled tokenizer; a ``tokenizer.json``
            file or a directory holding one (HF layout); otherwise a hub name such as
            ``"EleutherAI/gpt-neox-20b"`` (downloaded once, then read from the HF cache).
    """
    from transformers import PreTrainedTokenizerFast

    if name_or_path is None or str(name_or_path) == "default":
        name_or_path = DEFAULT_TOKENIZER_DIR
    path = Path(str(name_or_path)).expanduser()
    bare = path.is_dir() and not (path / "tokenizer_config.json").is_file()
    if bare and (path / "tokenizer.json").is_file():
        path = path / "tokenizer.json"  # a bare tokenizers-library save
    elif bare:
        from mamba_train.data.shards import DataError

        held = ", ".join(sorted(p.name for p in path.iterdir())[:6]) or "nothing"
        raise DataError(
            f"tokenizer {str(name_or_path)!r} is a directory without tokenizer.json (it holds "
            f"{held}): a tokenizers save_model() directory (vocab.json + merges.txt) is not a "
            "whole tokenizer; save it with Tokenizer.save('<dir>/tokenizer.json') or "
            "transformers' save_pretrained('<dir>') and pass that")
    if path.is_file():
        tok = PreTrainedTokenizerFast(tokenizer_file=str(path))
        if tok.eos_token is None and tok.convert_tokens_to_ids(DEFAULT_EOS) is not None:
            tok.eos_token = DEFAULT_EOS
    elif path.is_dir():
        tok = _auto_tokenizer(str(path))
    elif _looks_like_path(str(name_or_path)):
        raise TokenizerNotFoundError(f"tokenizer {name_or_path!r}: no such file or directory")
    else:
        try:
            tok = _auto_tokenizer(str(name_or_path))
        except OSError as e:  # offline, unknown repo, gated repo, ...
            raise TokenizerNotFoundError(
                f"could not load tokenizer {name_or_path!r} from the Hugging Face hub or its cache "
                f"({e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''}). Without "
                "internet, download it where there is (`huggingface-cli download NAME`, or "
                "`AutoTokenizer.from_pretrained(NAME).save_pretrained(DIR)`) and pass the directory, "
                "or use tokenizer=default."
            ) from None
    if not getattr(tok, "is_fast", False):
        raise TokenizerError(f"tokenizer {name_or_path!r} is not a fast (Rust) tokenizer")
    if tok.eos_token_id is None:
        raise TokenizerError(
            f"tokenizer {name_or_path!r} has no EOS token; prepare needs one to separate documents"
        )
    return tok


def load_backend(name_or_path: str | Path | None = None):
    """``(tokenizers.Tokenizer, {"name", "vocab_size", "eos_id"})`` for ``prepare``.

    The bundled tokenizer and ``tokenizer.json`` files are read with the ``tokenizers`` library
    alone: importing ``transformers`` (and with it torch) costs seconds per process, which
    matters for a CLI and its worker processes. Anything else goes through
    :func:`load_tokenizer`.
    """
    from tokenizers import Tokenizer

    path = DEFAULT_TOKENIZER_DIR if name_or_path is None or str(name_or_path) == "default" \
        else Path(str(name_or_path)).expanduser()
    if path.is_dir() and (path / "tokenizer_config.json").is_file() and (path / "tokenizer.json").is_file():
        config = json.loads((path / "tokenizer_config.json").read_text())
        eos_token = config.get("eos_token")
        eos_token = eos_token.get("content") if isinstance(eos_token, dict) else eos_token
        path = path / "tokenizer.json" if config.get("tokenizer_class") == "PreTrainedTokenizerFast" else path
    else:
        eos_token = DEFAULT_EOS
    if path.is_file():
        tok = Tokenizer.from_file(str(path))
        eos = tok.token_to_id(eos_token) if eos_token else None
        if eos is not None:
            info = {"name": tokenizer_name(name_or_path), "eos_id": eos,
                    "vocab_size": tok.get_vocab_size(with_added_tokens=True)}
            return tok, info
    hf = load_tokenizer(name_or_path)
    info = {"name": tokenizer_name(name_or_path), "vocab_size": vocab_size(hf), "eos_id": eos_id(hf)}
    return hf.backend_tokenizer, info


def tokenizer_name(name_or_path: str | Path | None) -> str:
    """The name recorded in a dataset index: ``"default"``, a hub name, or an absolute path."""
    if name_or_path is None or str(name_or_path) == "default":
        return "default"
    path = Path(str(name_or_path)).expanduser()
    return str(path.resolve()) if path.exists() else str(name_or_path)


def eos_id(tokenizer) -> int:
    """The end-of-document token id, appended after every document."""
    return int(tokenizer.eos_token_id)


def vocab_size(tokenizer) -> int:
    """Number of ids the model's embedding must cover (base vocabulary + added tokens)."""
    return len(tokenizer)


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.endswith(".json") or name.count("/") > 1
