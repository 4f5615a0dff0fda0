"""Tokenizer loading: the bundled default, a local file/directory, or a Hugging Face hub name.

Everything downstream (prepare, the data index, the model's ``vocab_size``) only needs a *fast*
HF tokenizer, its vocabulary size (``len(tokenizer)``, which counts added special tokens, the
number the embedding must cover) and its end-of-document id. The default is a 4096-entry
byte-level BPE bundled in ``mamba_train/assets/tokenizer`` (see
``scripts/build_default_tokenizer.py``) so that nothing needs the network.
"""

from __future__ import annotations

from pathlib import Path

DEFAULT_TOKENIZER_DIR = Path(__file__).resolve().parents[1] / "assets" / "tokenizer"
DEFAULT_EOS = "<|endoftext|>"


def load_tokenizer(name_or_path: str | Path | None = None):
    """A ``transformers`` fast tokenizer.

    Args:
        name_or_path: ``None`` or ``"default"`` for the bundled tokenizer; a ``tokenizer.json``
            file or a directory holding one (HF layout); otherwise a hub name such as
            ``"EleutherAI/gpt-neox-20b"`` (downloaded once, then read from the HF cache).
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if name_or_path is None or str(name_or_path) == "default":
        name_or_path = DEFAULT_TOKENIZER_DIR
    path = Path(str(name_or_path)).expanduser()
    if path.is_file():
        tok = PreTrainedTokenizerFast(tokenizer_file=str(path))
        if tok.eos_token is None and tok.convert_tokens_to_ids(DEFAULT_EOS) is not None:
            tok.eos_token = DEFAULT_EOS
    elif path.is_dir():
        tok = AutoTokenizer.from_pretrained(str(path), use_fast=True)
    elif _looks_like_path(str(name_or_path)):
        raise FileNotFoundError(f"tokenizer {name_or_path!r}: no such file or directory")
    else:
        try:
            tok = AutoTokenizer.from_pretrained(str(name_or_path), use_fast=True)
        except OSError as e:  # offline, unknown repo, gated repo, ...
            raise OSError(
                f"could not load tokenizer {name_or_path!r} from the Hugging Face hub or its cache "
                f"({e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''}). Without "
                "internet, download it where there is (`huggingface-cli download NAME`, or "
                "`AutoTokenizer.from_pretrained(NAME).save_pretrained(DIR)`) and pass the directory, "
                "or use tokenizer=default."
            ) from e
    if not getattr(tok, "is_fast", False):
        raise TypeError(f"tokenizer {name_or_path!r} is not a fast (Rust) tokenizer")
    if tok.eos_token_id is None:
        raise ValueError(
            f"tokenizer {name_or_path!r} has no EOS token; prepare needs one to separate documents"
        )
    return tok


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
