"""``export_hf``: write a Hugging Face ``transformers`` directory (``config.json``,
``model.safetensors`` and the tokenizer) that ``AutoModelForCausalLM.from_pretrained`` and
``AutoTokenizer.from_pretrained`` load, from a ``MambaLM`` or any source ``read_weights`` reads.
The mapping itself is ``formats/hf.py``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping

import torch

from mamba_train.dtypes import parse_dtype
from mamba_train.fileio import atomic_write
from mamba_train.formats.hf import (CONFIG_NAME, SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME,
                                    WEIGHTS_INDEX_NAME, WEIGHTS_NAME, ExportError, to_hf_config,
                                    to_hf_state_dict)
from mamba_train.formats.load import read_weights, tokenizer_of
from mamba_train.models.config import MambaLMConfig

log = logging.getLogger(__name__)

_OTHER_WEIGHT_FILES = (SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME)


def export_hf(model_or_path, out_dir: str | Path, dtype: torch.dtype | str | None = None,
              tokenizer=None) -> Path:
    """Write a transformers directory (``config.json``, ``model.safetensors``, tokenizer files).

    Args:
        model_or_path: a ``MambaLM``, or anything ``read_weights`` reads (a mamba_train
            ``.ckpt``, a mamba_ssm directory, a transformers directory).
        out_dir: created if needed.
        dtype: cast floating-point tensors (``torch.float32``, ``"bfloat16"``...); default keeps
            the source dtypes. Recorded as ``dtype`` in ``config.json``.
        tokenizer: a tokenizer object, or a name/path as ``data.tokenizer`` takes it
            (``default`` is the bundled one). Default: the tokenizer the source was trained
            with (``formats.load.tokenizer_of``); none is written only when the source
            records none. Its bos/eos/pad ids go into ``config.json``, so ``generate()`` stops
            at EOS.
    Raises:
        ExportError: the architecture has no transformers equivalent (the message names the
            field), or the tokenizer is larger than the embedding.
    """
    dtype = parse_dtype(dtype, "dtype", ExportError, allow_none=True)
    cfg, state = _resolve_source(model_or_path)
    tok = _load_tokenizer(tokenizer if tokenizer is not None else _source_tokenizer(model_or_path))
    ids: dict[str, int | None] = {}
    if tok is not None:
        if len(tok) > cfg.padded_vocab_size:
            raise ExportError(f"tokenizer has {len(tok)} tokens but the model's embedding has "
                              f"only {cfg.padded_vocab_size} rows")
        ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                   pad_token_id=tok.pad_token_id if tok.pad_token_id is not None
                   else tok.eos_token_id)
    hf_state = to_hf_state_dict(cfg, state, dtype)
    if dtype is None:
        floats = [t.dtype for t in hf_state.values() if t.is_floating_point()]
        dtype = floats[0] if floats else None
    hf_cfg = to_hf_config(cfg, dtype=dtype, **ids)
    _check_against_hf_model(hf_cfg, hf_state)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stale = [n for n in _OTHER_WEIGHT_FILES if (out / n).exists()]
    stale += [p.name for p in out.glob("model-*-of-*.safetensors")]
    if stale:
        raise ExportError(f"{out} already holds other weight files {stale}; transformers would "
                          "load those instead -- export into an empty directory")
    from safetensors.torch import save_file
    atomic_write(out / SAFE_WEIGHTS_NAME, lambda p: save_file(hf_state, p, metadata={"format": "pt"}))
    if tok is not None:
        tok.save_pretrained(out)
    else:
        log.warning("%s records no tokenizer, so none was exported: pass tokenizer=<name or path> "
                    "for a directory AutoTokenizer can load", model_or_path)
    # config last: a directory with a config.json is complete
    atomic_write(out / CONFIG_NAME, lambda p: Path(p).write_text(hf_cfg.to_json_string()))
    return out


def _check_against_hf_model(hf_cfg, hf_state: Mapping[str, torch.Tensor]) -> None:
    """Build transformers' model on the meta device and compare every name and shape."""
    import transformers

    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf_cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if head is not None and head.weight is emb.weight:  # tied: transformers re-ties on load
        expected.pop("lm_head.weight", None)  # (Nemotron-H never ties, whatever its flag says)
    missing = sorted(set(expected) - set(hf_state))
    unexpected = sorted(set(hf_state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(hf_state) if tuple(hf_state[k].shape) != expected[k])
    if missing or unexpected or wrong:
        raise ExportError(
            f"weights do not match transformers' {type(model).__name__}: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, wrong shape "
            f"{[(k, tuple(hf_state[k].shape), expected[k]) for k in wrong[:5]]}")


def _resolve_source(model_or_path) -> tuple[MambaLMConfig, dict[str, torch.Tensor]]:
    if isinstance(model_or_path, (str, Path)):
        return read_weights(model_or_path)
    config = getattr(model_or_path, "config", None)
    if not isinstance(config, MambaLMConfig) or not hasattr(model_or_path, "state_dict"):
        raise ExportError(
            f"export_hf expects a MambaLM or a checkpoint path, got {type(model_or_path).__name__}")
    return config, dict(model_or_path.state_dict())


def _source_tokenizer(model_or_path) -> str | None:
    return tokenizer_of(model_or_path) if isinstance(model_or_path, (str, Path)) else None


def _load_tokenizer(tokenizer):
    if tokenizer is None:
        return None
    if isinstance(tokenizer, (str, Path)):
        from mamba_train.data.tokenizer import load_tokenizer
        return load_tokenizer(tokenizer)
    if not hasattr(tokenizer, "save_pretrained"):
        raise ExportError(f"tokenizer must be a name, a path or a transformers tokenizer, got "
                          f"{type(tokenizer).__name__}")
    return tokenizer
