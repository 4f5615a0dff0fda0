"""Export to the Hugging Face ``transformers`` format: ``export_hf(model_or_path, out_dir)``
writes ``config.json`` + ``model.safetensors`` that ``AutoModelForCausalLM.from_pretrained``
loads. The config/state-dict mapping and ``read_hf`` live in ``mamba_train.hf_format``
(re-exported here).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Mapping

import torch

from mamba_train.dtypes import parse_dtype
from mamba_train.fileio import atomic_write
from mamba_train.hf_format import (  # noqa: F401  (re-exported: the public names of this module)
    CONFIG_NAME, HF_MODEL_TYPES, SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, STASH_KEY,
    WEIGHTS_INDEX_NAME, WEIGHTS_NAME, ExportError, check_hf_compatible, config_from_hf,
    decode_special_floats, from_hf_config, from_hf_state_dict, hf_config_fields, hf_key,
    our_key, read_hf, read_hf_config, to_hf_config, to_hf_state_dict)
from mamba_train.formats.hf_hybrids import family_for, is_hybrid
from mamba_train.formats.hf_hybrids import hf_config as hybrid_config
from mamba_train.formats.hf_hybrids import to_hf_state_dict as hybrid_state_dict
from mamba_train.models.config import MambaLMConfig


def _check_against_hf_model(hf_cfg, hf_state: Mapping[str, torch.Tensor]) -> None:
    """Build transformers' model on the meta device and compare every name and shape."""
    import transformers

    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf_cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if head is not None and head.weight is emb.weight:  # tied: transformers re-ties on load
        expected.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(hf_state))
    unexpected = sorted(set(hf_state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(hf_state)
                   if tuple(hf_state[k].shape) != expected[k])
    if missing or unexpected or wrong:
        raise ExportError(
            f"weights do not match transformers' {type(model).__name__}: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, wrong shape "
            f"{[(k, tuple(hf_state[k].shape), expected[k]) for k in wrong[:5]]}"
        )


def _resolve_source(model_or_path) -> tuple[MambaLMConfig, dict[str, torch.Tensor]]:
    if isinstance(model_or_path, (str, Path)):
        from mamba_train.checkpoint import read_weights
        return read_weights(model_or_path)
    config = getattr(model_or_path, "config", None)
    if not isinstance(config, MambaLMConfig) or not hasattr(model_or_path, "state_dict"):
        raise ExportError(
            f"export_hf expects a MambaLM or a checkpoint path, got {type(model_or_path).__name__}"
        )
    return config, dict(model_or_path.state_dict())


_OTHER_WEIGHT_FILES = (SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME)


def export_hf(model_or_path, out_dir: str | Path, dtype: torch.dtype | str | None = None,
              tokenizer=None) -> Path:
    """Write a transformers ``MambaForCausalLM`` / ``Mamba2ForCausalLM`` directory, or for a
    hybrid the first of ``NemotronHForCausalLM`` / ``BambaForCausalLM`` / ``FalconH1ForCausalLM``
    that represents it (an :class:`ExportError` says, per family, what does not fit).

    Args:
        model_or_path: a ``MambaLM``, or anything ``load.read_weights`` reads (a Lightning
            ``.ckpt``, a mamba_ssm directory, a transformers directory).
        out_dir: created if needed; receives ``config.json`` + ``model.safetensors`` (and the
            tokenizer files).
        dtype: cast floating-point tensors (``torch.float32``, ``"bfloat16"``...); default keeps
            the source dtypes. Recorded as ``dtype`` in ``config.json``.
        tokenizer: a tokenizer object (``save_pretrained``) or a name/path for
            ``AutoTokenizer.from_pretrained``; saved into ``out_dir``, and its bos/eos/pad ids go
            into the config.
    Raises:
        ExportError: the architecture has no transformers equivalent (the message names the
            field), or the tokenizer is larger than the embedding.
    """
    dtype = _as_dtype(dtype)
    cfg, state = _resolve_source(model_or_path)
    tok = _load_tokenizer(tokenizer)
    ids: dict[str, int | None] = {}
    if tok is not None:
        n_tok = len(tok)
        if n_tok > cfg.padded_vocab_size:
            raise ExportError(
                f"tokenizer has {n_tok} tokens but the model's embedding has only "
                f"{cfg.padded_vocab_size} rows"
            )
        ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                   pad_token_id=tok.pad_token_id if tok.pad_token_id is not None
                   else tok.eos_token_id)
    if is_hybrid(cfg):  # Nemotron-H, Bamba or Falcon-H1 (formats/hf_hybrids.py)
        family = family_for(cfg)
        if ids:
            cfg = dataclasses.replace(cfg, special_token_ids={
                k: v for k, v in ids.items() if v is not None})
        hf_state = hybrid_state_dict(cfg, family, state, dtype)
        if dtype is None:
            dtype = next(t.dtype for t in hf_state.values() if t.is_floating_point())
        hf_cfg = hybrid_config(cfg, family, dtype)
    else:
        hf_state = to_hf_state_dict(cfg, state, dtype)
        if dtype is None:
            emb = hf_state.get("backbone.embeddings.weight")
            dtype = emb.dtype if emb is not None else None
        hf_cfg = to_hf_config(cfg, dtype=dtype, **ids)
    _check_against_hf_model(hf_cfg, hf_state)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stale = [n for n in _OTHER_WEIGHT_FILES if (out / n).exists()]
    stale += [p.name for p in out.glob("model-*-of-*.safetensors")]
    if stale:
        raise ExportError(
            f"{out} already holds other weight files {stale}; transformers would load those "
            "instead -- export into an empty directory"
        )
    from safetensors.torch import save_file
    atomic_write(out / SAFE_WEIGHTS_NAME,
                  lambda p: save_file(hf_state, p, metadata={"format": "pt"}))
    if tok is not None:
        tok.save_pretrained(out)
    # config last: a directory with a config.json is complete
    atomic_write(out / CONFIG_NAME, lambda p: Path(p).write_text(hf_cfg.to_json_string()))
    return out


def _as_dtype(dtype) -> torch.dtype | None:
    return parse_dtype(dtype, "dtype", ExportError, allow_none=True)


def _load_tokenizer(tokenizer):
    if tokenizer is None:
        return None
    if isinstance(tokenizer, (str, Path)):
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(str(tokenizer))
    if not hasattr(tokenizer, "save_pretrained"):
        raise ExportError(f"tokenizer must be a name, a path or a transformers tokenizer, got "
                          f"{type(tokenizer).__name__}")
    return tokenizer


# ---------------------------------------------------------------------------------------------
# import
# ---------------------------------------------------------------------------------------------
