"""Hugging Face ``transformers`` directories: the config and state-dict mapping of every
registered family, and ``read_hf``, which reads a directory without building the transformers
model (so no ``_init_weights`` can touch the trained Δ bias / A_log / D on the way in). Writing
one is ``formats/hf_export.py``.

Families live in :data:`FAMILIES`, keyed by transformers' ``model_type``: each is an
:class:`~mamba_train.formats.hf_family.HFFamily` (config fields both ways, state-dict names).
Adding one is a module that defines it and one entry in :data:`FAMILIES`; nothing here branches
on a family. Export asks every family that ``claims`` the config, in registry order, and takes
the first that can represent it.

The ``config.json`` also carries our own config under ``mamba_train_config``: transformers
ignores the key, and ``read_hf`` uses it to restore what transformers has no field for (the
unpadded vocabulary size, ``pad_vocab_size_multiple``, init-only knobs such as
``A_init_range``), but only when it agrees with the transformers fields -- those stay
authoritative if someone edited the file.
"""

from __future__ import annotations

import dataclasses

import json
import logging
import math
from pathlib import Path
from typing import Any, Mapping

import torch

from mamba_train.formats import hf_hybrid_families, hf_jamba, hf_mamba, hf_moe_granite
from mamba_train.formats.hf_family import ExportError, HFFamily
from mamba_train.models.config import ConfigError, MambaLMConfig
from mamba_train.models.mamba_ssm_format import CONFIG_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_NAME

log = logging.getLogger(__name__)

FAMILIES: dict[str, HFFamily] = {
    f.model_type: f for f in (*hf_mamba.FAMILIES, *hf_hybrid_families.FAMILIES,
                              *hf_moe_granite.FAMILIES, *hf_jamba.FAMILIES)}

SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
WEIGHTS_INDEX_NAME = "pytorch_model.bin.index.json"
STASH_KEY = "mamba_train_config"


# ---------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------
def family_for(cfg: MambaLMConfig) -> tuple[HFFamily, dict[str, Any]]:
    """The first family that can represent ``cfg`` (registry order, those it can have been
    read from first), with its config fields.
    Raises :class:`ExportError` naming the field (every claiming family's reason, if several)."""
    refusals = []  # the families it can have been read from first: HFFamily's docstring
    families = sorted(FAMILIES.values(), key=lambda f: (
        bool(cfg.layer_pattern) and not f.layered,
        not cfg.n_ssm_layers and f.ssm_layer != cfg.layer))
    for family in families:
        if family.claims(cfg):
            try:
                return family, family.config_fields(cfg)
            except ExportError as e:
                refusals.append((family, e))
    if not refusals:
        raise ExportError(
            f"model.ssm_cfg.layer={cfg.layer}: transformers has no model class for it (known "
            f"families: {', '.join(FAMILIES)}); export format=mamba_ssm (mamba_ssm's "
            "MambaLMHeadModel reads it)")
    if len(refusals) == 1:
        raise refusals[0][1]
    raise ExportError("; ".join(f"{f.model_type}: {e}" for f, e in refusals))


def check_hf_compatible(cfg: MambaLMConfig) -> None:
    """Raise :class:`ExportError` naming the first field no transformers family can hold."""
    family_for(cfg)


def to_hf_config(cfg: MambaLMConfig, dtype: torch.dtype | None = None,
                 bos_token_id: int | None = None, eos_token_id: int | None = None,
                 pad_token_id: int | None = None):
    """The transformers config object for ``cfg`` (raises :class:`ExportError`).

    Special-token ids are tokenizer facts: they are set from the arguments (``export_hf`` takes
    them from the tokenizer), else from ``cfg.special_token_ids`` (those of the transformers
    checkpoint the model came from), and are otherwise None rather than transformers' class
    defaults, which may be wrong.
    """
    import transformers

    family, fields = family_for(cfg)
    config_cls = getattr(transformers, family.config_class)
    ids = dict(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    # else the ids of the transformers checkpoint this model came from (a hybrid family's)
    ids = {k: v if v is not None else cfg.special_token_ids.get(k) for k, v in ids.items()}
    if cfg.padding_idx is not None:  # the row kept frozen here is the one transformers freezes
        ids["pad_token_id"] = cfg.padding_idx
    from huggingface_hub.errors import StrictDataclassError  # transformers' config validation

    try:
        hf_cfg = config_cls(**fields, **ids)
    except (ValueError, StrictDataclassError) as e:
        why = " ".join(str(e).split())
        raise ExportError(f"transformers' {family.config_class} rejects the fields written for "
                          f"this model ({why})") from e
    hf_cfg.architectures = [family.architecture]
    if dtype is not None:
        hf_cfg.dtype = dtype
    setattr(hf_cfg, STASH_KEY, cfg.to_dict())
    return hf_cfg


def _family_of(raw: Mapping[str, Any]) -> HFFamily:
    model_type = raw.get("model_type")
    if model_type not in FAMILIES:
        raise ExportError(f"config.json model_type={model_type!r}: mamba_train reads the "
                          f"transformers families {', '.join(FAMILIES)}")
    return FAMILIES[model_type]


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    return a == b


def config_from_hf(raw: Mapping[str, Any]) -> MambaLMConfig:
    """The family's config from the transformers fields, or the stashed ``mamba_train_config``
    where it describes the same transformers fields."""
    family = _family_of(raw)
    derived = family.from_config(raw)
    stash = raw.get(STASH_KEY)
    if not isinstance(stash, dict):
        return derived
    try:
        stashed = MambaLMConfig.from_dict(stash)
        want = family.config_fields(stashed)
    except (ConfigError, ExportError, TypeError) as e:
        log.warning("ignoring unusable %s in config.json (%s)", STASH_KEY, e)
        return derived
    have = family.config_fields(derived)
    differ = sorted(k for k in want if not _same(want[k], have.get(k)))
    if differ:
        log.warning("config.json fields %s were changed after export; ignoring the stashed %s",
                    differ, STASH_KEY)
        return derived
    # the special ids and the frozen embedding row (transformers builds it from pad_token_id)
    # are the file's own, which tokenizer changes may have edited
    return dataclasses.replace(stashed, padding_idx=derived.padding_idx,
                               special_token_ids=derived.special_token_ids)


_FLOAT_TAGS = {"Infinity": math.inf, "-Infinity": -math.inf, "NaN": math.nan}


def decode_special_floats(obj: Any) -> Any:
    """transformers >= 5 writes inf/nan as ``{"__float__": "Infinity"}``; older ones as ``Infinity``."""
    if isinstance(obj, dict):
        if set(obj) == {"__float__"} and obj["__float__"] in _FLOAT_TAGS:
            return _FLOAT_TAGS[obj["__float__"]]
        return {k: decode_special_floats(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [decode_special_floats(v) for v in obj]
    return obj


def read_hf_config(path: str | Path) -> MambaLMConfig:
    """The :class:`MambaLMConfig` of a transformers directory (or its config.json)."""
    path = Path(path)
    cfg_file = path / CONFIG_NAME if path.is_dir() else path
    return config_from_hf(decode_special_floats(json.loads(cfg_file.read_text())))


# ---------------------------------------------------------------------------------------------
# weights
# ---------------------------------------------------------------------------------------------
def to_hf_state_dict(cfg: MambaLMConfig, state: Mapping[str, torch.Tensor],
                     dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """mamba_ssm-named tensors -> the family's names, contiguous CPU tensors (tied head dropped:
    transformers re-ties it, and safetensors refuses shared storage anyway)."""
    family, _ = family_for(cfg)
    if cfg.tie_embeddings:
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    out = {}
    for name, tensor in family.to_hf(cfg, state).items():
        t = tensor.detach().to("cpu")
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        out[name] = t.contiguous()
    return out


def from_hf_state_dict(cfg: MambaLMConfig, state: Mapping[str, torch.Tensor],
                       source: str = "checkpoint", family: HFFamily | None = None
                       ) -> dict[str, torch.Tensor]:
    """transformers-named tensors -> mamba_ssm names (tied head removed after checking it)."""
    family = family or family_for(cfg)[0]
    state = dict(state)
    prefix = family.base_model_prefix + "."
    if state and not any(k.startswith(prefix) for k in state):  # saved from the bare base model
        state = {(k if k.startswith("lm_head.") else prefix + k): v for k, v in state.items()}
    out = family.from_hf(cfg, state)
    if cfg.tie_embeddings and "lm_head.weight" in out:
        emb = out.get("backbone.embedding.weight")
        if emb is not None and not torch.equal(out["lm_head.weight"], emb):
            raise ExportError(
                f"{source}: tie_word_embeddings=True but lm_head.weight differs from the "
                "embedding; the checkpoint is inconsistent"
            )
        del out["lm_head.weight"]
    return out


def _read_weight_files(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if (path / SAFE_WEIGHTS_NAME).is_file():
        return load_file(path / SAFE_WEIGHTS_NAME)
    for index_name, load in ((SAFE_WEIGHTS_INDEX_NAME, load_file), (WEIGHTS_INDEX_NAME, _load_bin)):
        if (path / index_name).is_file():
            index = json.loads((path / index_name).read_text())
            state: dict[str, torch.Tensor] = {}
            for shard in sorted(set(index["weight_map"].values())):
                state.update(load(path / shard))
            return state
    if (path / WEIGHTS_NAME).is_file():
        return _load_bin(path / WEIGHTS_NAME)
    raise FileNotFoundError(
        f"{path} has a transformers config.json but none of {SAFE_WEIGHTS_NAME}, "
        f"{SAFE_WEIGHTS_INDEX_NAME}, {WEIGHTS_NAME}, {WEIGHTS_INDEX_NAME}"
    )


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def read_hf(path: str | Path) -> tuple[MambaLMConfig, dict[str, torch.Tensor]]:
    """(config, state dict in mamba_ssm key names) of a transformers directory; every returned
    tensor is exactly what the file holds."""
    path = Path(path)
    raw = decode_special_floats(json.loads((path / CONFIG_NAME).read_text()))
    cfg = config_from_hf(raw)
    state = from_hf_state_dict(cfg, _read_weight_files(path), source=str(path),
                               family=_family_of(raw))
    return cfg, state
