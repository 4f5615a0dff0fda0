"""Hugging Face ``transformers`` Mamba/Mamba2 format (``MambaForCausalLM`` /
``Mamba2ForCausalLM``): the config and state-dict mapping, and reading a transformers directory.
Writing one (``export_hf``) is ``mamba_train.export.hf``; this module sits outside ``export/`` so
that loading (``mamba_train.checkpoint``) does not import the exporter.

* ``to_hf_config(cfg)`` maps a :class:`MambaLMConfig` to ``transformers.MambaConfig`` (Mamba-1) or
  ``transformers.Mamba2Config`` (Mamba-2), refusing with an :class:`ExportError` naming the field
  whatever transformers' modules cannot compute (MLPs, attention layers, LayerNorm, Mamba-2
  variants without the gated RMSNorm, Mamba-3, ...).
* ``read_hf(path)`` is the inverse: ``(MambaLMConfig, state dict in mamba_ssm key names)``. It
  reads the weight files directly and never instantiates the transformers model, so no
  ``_init_weights`` can touch the trained Δ bias / A_log / D on the way in.

State-dict names differ in one place only: mamba_ssm's ``backbone.embedding.weight`` is
transformers' ``backbone.embeddings.weight``; every mixer / norm name is the same, and the tied
``lm_head.weight`` is not stored (transformers re-ties it from ``tie_word_embeddings``).

The HF ``config.json`` also carries our own config under ``mamba_train_config``: transformers
ignores the key, and ``read_hf`` uses it to restore what HF has no field for (the unpadded
vocabulary size, ``pad_vocab_size_multiple``, init-only knobs such as ``A_init_range``), but only
when it agrees with the HF fields -- those stay authoritative if someone edited the file.
"""

import json
import logging
import math
from pathlib import Path
from typing import Any, Mapping

import torch

from mamba_train.errors import MambaTrainError
from mamba_train.models.config import (
    MAMBA1_DEFAULTS,
    MAMBA2_DEFAULTS,
    ConfigError,
    MambaLMConfig,
)
from mamba_train.models.mamba_ssm_format import CONFIG_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_NAME

log = logging.getLogger(__name__)

SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
WEIGHTS_INDEX_NAME = "pytorch_model.bin.index.json"
STASH_KEY = "mamba_train_config"
HF_MODEL_TYPES = {"Mamba1": "mamba", "Mamba2": "mamba2"}

# mamba_ssm name -> transformers name (prefix rewrites; everything else is identical)
_OURS_TO_HF = (("backbone.embedding.", "backbone.embeddings."),)

# mamba_ssm's Mamba2 builds its gated RMSNorm with a hard-coded eps (modules/mamba2.py);
# transformers' Mamba2Mixer uses config.layer_norm_epsilon for it.
MAMBA2_GATED_NORM_EPS = 1e-5

# Our init defaults (models/init.py) for the two initializer_cfg keys HF has fields for.
_INIT_DEFAULTS = {"initializer_range": 0.02, "rescale_prenorm_residual": True}


class ExportError(MambaTrainError, ValueError):
    """A model that transformers cannot represent (or a bad export request); names the field."""


# ---------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------
def check_hf_compatible(cfg: MambaLMConfig) -> None:
    """Raise :class:`ExportError` naming the first field transformers' Mamba models cannot hold.

    transformers 5.x ``MambaBlock`` / ``Mamba2Block`` are ``RMSNorm -> mixer -> add`` with no
    MLP, no attention, RMSNorm only; ``Mamba2Mixer`` always applies the gated RMSNorm with the
    gate *before* the norm (``norm_before_gate=False``), over the full inner width, with a
    per-head ``D``, and reads its eps from ``layer_norm_epsilon``.
    """
    if cfg.layer not in HF_MODEL_TYPES:
        raise ExportError(
            f"model.ssm_cfg.layer={cfg.layer}: transformers has no {cfg.layer} model class; "
            "export format=mamba_ssm (mamba_ssm's MambaLMHeadModel reads it)")
    cant = "transformers' {cls} cannot represent it"
    cls = "MambaForCausalLM" if cfg.layer == "Mamba1" else "Mamba2ForCausalLM"
    if cfg.d_intermediate > 0:
        raise ExportError(
            f"model.d_intermediate={cfg.d_intermediate}: blocks with a gated MLP after the mixer "
            f"are a mamba_ssm-only architecture; {cant.format(cls=cls)} (export format=mamba_ssm)"
        )
    if cfg.attn_layer_idx:
        raise ExportError(
            f"model.attn_layer_idx={cfg.attn_layer_idx}: hybrid models with attention layers "
            f"have no transformers equivalent; {cant.format(cls=cls)} (export format=mamba_ssm)"
        )
    if not cfg.rms_norm:
        raise ExportError(
            f"model.rms_norm=False (LayerNorm): {cant.format(cls=cls)}, its blocks and final "
            "norm are RMSNorm only"
        )
    kw = cfg.mixer_kwargs()
    if not isinstance(kw["expand"], int) or isinstance(kw["expand"], bool):
        raise ExportError(
            f"model.ssm_cfg.expand={kw['expand']!r}: transformers' config needs an integer expand"
        )
    if cfg.layer == "Mamba1":
        if kw["dt_init"] not in ("random", "constant"):
            raise ExportError(f"model.ssm_cfg.dt_init={kw['dt_init']!r} is not 'random'/'constant'")
        return
    d_inner = kw["expand"] * cfg.d_model
    if kw["d_ssm"] is not None and kw["d_ssm"] != d_inner:
        raise ExportError(
            f"model.ssm_cfg.d_ssm={kw['d_ssm']} != d_model*expand={d_inner}: a Mamba-2 mixer with "
            f"an extra gated-MLP part in in_proj; {cant.format(cls=cls)}"
        )
    if kw["D_has_hdim"]:
        raise ExportError(
            f"model.ssm_cfg.D_has_hdim=True: transformers' Mamba2Mixer has one D per head "
            f"(shape [num_heads]); {cant.format(cls=cls)}"
        )
    if not kw["rmsnorm"]:
        raise ExportError(
            f"model.ssm_cfg.rmsnorm=False: transformers' Mamba2Mixer always applies the gated "
            f"RMSNorm; {cant.format(cls=cls)}"
        )
    if kw["norm_before_gate"]:
        raise ExportError(
            f"model.ssm_cfg.norm_before_gate=True: transformers' Mamba2Mixer gates before the "
            f"norm (norm_before_gate=False) unconditionally; {cant.format(cls=cls)}"
        )
    if cfg.norm_epsilon != MAMBA2_GATED_NORM_EPS:
        raise ExportError(
            f"model.norm_epsilon={cfg.norm_epsilon}: transformers' Mamba2 uses layer_norm_epsilon "
            f"also inside the mixer's gated RMSNorm, which mamba_ssm fixes at "
            f"{MAMBA2_GATED_NORM_EPS}; only norm_epsilon={MAMBA2_GATED_NORM_EPS} exports exactly"
        )


def hf_config_fields(cfg: MambaLMConfig) -> dict[str, Any]:
    """The transformers config fields (name -> value) that describe ``cfg``; checks first."""
    check_hf_compatible(cfg)
    kw = cfg.mixer_kwargs()
    init_cfg = {**_INIT_DEFAULTS, **cfg.initializer_cfg}
    fields: dict[str, Any] = dict(
        model_type=HF_MODEL_TYPES[cfg.layer],
        hidden_size=cfg.d_model,
        num_hidden_layers=cfg.n_layer,
        vocab_size=cfg.padded_vocab_size,  # the embedding's real size
        state_size=kw["d_state"],
        expand=kw["expand"],
        conv_kernel=kw["d_conv"],
        use_bias=bool(kw["bias"]),
        use_conv_bias=bool(kw["conv_bias"]),
        hidden_act="silu",
        time_step_min=float(kw["dt_min"]),
        time_step_max=float(kw["dt_max"]),
        time_step_floor=float(kw["dt_init_floor"]),
        layer_norm_epsilon=float(cfg.norm_epsilon),
        residual_in_fp32=bool(cfg.residual_in_fp32),
        tie_word_embeddings=bool(cfg.tie_embeddings),
        initializer_range=float(init_cfg["initializer_range"]),
        # Always False, whatever our init used: transformers (5.x) re-runs ``_init_weights``
        # after ``from_pretrained`` and its un-guarded ``out_proj.weight /= sqrt(n_layer)``
        # would shrink the *trained* out_proj weights on every load. It is an init-only knob
        # (our own value survives in the stashed config).
        rescale_prenorm_residual=False,
    )
    if cfg.layer == "Mamba1":
        fields.update(
            time_step_rank=int(kw["dt_rank"]),
            time_step_scale=float(kw["dt_scale"]),
            time_step_init_scheme=kw["dt_init"],
        )
    else:
        d_inner = kw["expand"] * cfg.d_model
        fields.update(
            num_heads=d_inner // kw["headdim"],
            head_dim=kw["headdim"],
            n_groups=kw["ngroups"],
            chunk_size=kw["chunk_size"],
            time_step_limit=[float(v) for v in kw["dt_limit"]],
        )
    return fields


def to_hf_config(cfg: MambaLMConfig, dtype: torch.dtype | None = None,
                 bos_token_id: int | None = None, eos_token_id: int | None = None,
                 pad_token_id: int | None = None):
    """``transformers.MambaConfig`` / ``Mamba2Config`` for ``cfg`` (raises :class:`ExportError`).

    Special-token ids are tokenizer facts that our config does not record: they are set from the
    arguments (``export_hf`` takes them from the tokenizer) and are otherwise None rather than
    transformers' defaults (0/0/0 for Mamba, 0/2/1 for Mamba-2), which may be wrong.
    """
    import transformers

    fields = hf_config_fields(cfg)
    model_type = fields.pop("model_type")
    config_cls = transformers.MambaConfig if model_type == "mamba" else transformers.Mamba2Config
    hf_cfg = config_cls(**fields, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                        pad_token_id=pad_token_id)
    hf_cfg.architectures = ["MambaForCausalLM" if model_type == "mamba" else "Mamba2ForCausalLM"]
    if dtype is not None:
        hf_cfg.dtype = dtype
    setattr(hf_cfg, STASH_KEY, cfg.to_dict())
    return hf_cfg


def _get(raw: Mapping[str, Any], key: str, defaults: Any) -> Any:
    return raw[key] if key in raw else getattr(defaults, key)


def from_hf_config(raw: Mapping[str, Any]) -> MambaLMConfig:
    """A :class:`MambaLMConfig` from a transformers Mamba/Mamba2 ``config.json`` dict.

    Missing keys take transformers' class defaults. The vocabulary is the embedding size, with
    ``pad_vocab_size_multiple`` 8 when it divides it (so the padded size is unchanged) else 1.
    """
    import transformers

    model_type = raw.get("model_type")
    if model_type not in ("mamba", "mamba2"):
        raise ExportError(f"config.json model_type={model_type!r} is not 'mamba' or 'mamba2'")
    defaults = transformers.MambaConfig if model_type == "mamba" else transformers.Mamba2Config
    g = lambda key: _get(raw, key, defaults)  # noqa: E731
    d_model = int(g("hidden_size"))
    act = g("hidden_act")
    if act != "silu":
        raise ExportError(f"config.json hidden_act={act!r}: mamba_ssm mixers use silu only")
    vocab = int(g("vocab_size"))
    ssm: dict[str, Any] = {}
    if model_type == "mamba":
        dt_rank = g("time_step_rank")
        dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        values = dict(
            d_state=int(g("state_size")), d_conv=int(g("conv_kernel")), expand=g("expand"),
            dt_rank="auto" if dt_rank == math.ceil(d_model / 16) else dt_rank,
            dt_min=float(g("time_step_min")), dt_max=float(g("time_step_max")),
            dt_init=g("time_step_init_scheme"), dt_scale=float(g("time_step_scale")),
            dt_init_floor=float(g("time_step_floor")), conv_bias=bool(g("use_conv_bias")),
            bias=bool(g("use_bias")),
        )
        ssm.update({k: v for k, v in values.items() if MAMBA1_DEFAULTS[k] != v})
    else:
        eps = float(g("layer_norm_epsilon"))
        if eps != MAMBA2_GATED_NORM_EPS:
            raise ExportError(
                f"config.json layer_norm_epsilon={eps}: transformers' Mamba2 uses it inside the "
                f"mixer's gated RMSNorm too, where mamba_ssm fixes eps={MAMBA2_GATED_NORM_EPS}; "
                "this model cannot be reproduced exactly"
            )
        expand, heads, head_dim = g("expand"), int(g("num_heads")), int(g("head_dim"))
        if heads * head_dim != int(expand * d_model):
            raise ExportError(
                f"config.json num_heads*head_dim={heads}*{head_dim} != hidden_size*expand="
                f"{d_model}*{expand}"
            )
        ssm["layer"] = "Mamba2"
        values = dict(
            d_state=int(g("state_size")), d_conv=int(g("conv_kernel")), expand=expand,
            headdim=head_dim, ngroups=int(g("n_groups")), chunk_size=int(g("chunk_size")),
            dt_min=float(g("time_step_min")), dt_max=float(g("time_step_max")),
            dt_init_floor=float(g("time_step_floor")),
            dt_limit=tuple(float(v) for v in g("time_step_limit")),
            conv_bias=bool(g("use_conv_bias")), bias=bool(g("use_bias")),
        )
        ssm.update({k: v for k, v in values.items() if MAMBA2_DEFAULTS[k] != v})
    init_cfg = {k: type(d)(g(k)) for k, d in _INIT_DEFAULTS.items() if type(d)(g(k)) != d}
    try:
        return MambaLMConfig(
            d_model=d_model, n_layer=int(g("num_hidden_layers")), vocab_size=vocab,
            pad_vocab_size_multiple=8 if vocab % 8 == 0 else 1, ssm_cfg=ssm,
            rms_norm=True, residual_in_fp32=bool(g("residual_in_fp32")),
            tie_embeddings=bool(g("tie_word_embeddings")),
            norm_epsilon=float(g("layer_norm_epsilon")), initializer_cfg=init_cfg,
        )
    except ConfigError as e:
        raise ExportError(f"config.json describes an invalid model: {e}") from e


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    return a == b


def config_from_hf(raw: Mapping[str, Any]) -> MambaLMConfig:
    """``from_hf_config`` plus the stashed ``mamba_train_config`` where it agrees with the HF fields."""
    derived = from_hf_config(raw)
    stash = raw.get(STASH_KEY)
    if not isinstance(stash, dict):
        return derived
    try:
        stashed = MambaLMConfig.from_dict(stash)
        want = hf_config_fields(stashed)
    except (ConfigError, ExportError, TypeError) as e:
        log.warning("ignoring unusable %s in config.json (%s)", STASH_KEY, e)
        return derived
    have = hf_config_fields(derived)
    differ = sorted(k for k in want if not _same(want[k], have.get(k)))
    if differ:
        log.warning("config.json fields %s were changed after export; ignoring the stashed %s",
                    differ, STASH_KEY)
        return derived
    return stashed


# ---------------------------------------------------------------------------------------------
# weights
# ---------------------------------------------------------------------------------------------
def hf_key(name: str) -> str:
    for ours, theirs in _OURS_TO_HF:
        if name.startswith(ours):
            return theirs + name[len(ours):]
    return name


def our_key(name: str) -> str:
    for ours, theirs in _OURS_TO_HF:
        if name.startswith(theirs):
            return ours + name[len(theirs):]
    return name


def to_hf_state_dict(cfg: MambaLMConfig, state: Mapping[str, torch.Tensor],
                     dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """mamba_ssm-named tensors -> transformers-named, contiguous CPU tensors (tied head dropped)."""
    out = {}
    for name, tensor in state.items():
        if cfg.tie_embeddings and name == "lm_head.weight":
            continue  # transformers re-ties it; safetensors refuses shared storage anyway
        t = tensor.detach().to("cpu")
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        out[hf_key(name)] = t.contiguous()
    return out


def from_hf_state_dict(cfg: MambaLMConfig, state: Mapping[str, torch.Tensor],
                       source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """transformers-named tensors -> mamba_ssm names (tied head removed after checking it)."""
    state = dict(state)
    if state and not any(k.startswith("backbone.") for k in state):
        # saved from a bare MambaModel / Mamba2Model (base_model_prefix = "backbone")
        state = {(k if k.startswith("lm_head.") else "backbone." + k): v for k, v in state.items()}
    out = {our_key(k): v for k, v in state.items()}
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
    if (path / SAFE_WEIGHTS_NAME).is_file():
        from safetensors.torch import load_file
        return load_file(path / SAFE_WEIGHTS_NAME)
    if (path / SAFE_WEIGHTS_INDEX_NAME).is_file():
        from safetensors.torch import load_file
        index = json.loads((path / SAFE_WEIGHTS_INDEX_NAME).read_text())
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(index["weight_map"].values())):
            state.update(load_file(path / shard))
        return state
    if (path / WEIGHTS_NAME).is_file():
        return torch.load(path / WEIGHTS_NAME, map_location="cpu", weights_only=True)
    if (path / WEIGHTS_INDEX_NAME).is_file():
        index = json.loads((path / WEIGHTS_INDEX_NAME).read_text())
        state = {}
        for shard in sorted(set(index["weight_map"].values())):
            state.update(torch.load(path / shard, map_location="cpu", weights_only=True))
        return state
    raise FileNotFoundError(
        f"{path} has a transformers config.json but none of {SAFE_WEIGHTS_NAME}, "
        f"{SAFE_WEIGHTS_INDEX_NAME}, {WEIGHTS_NAME}, {WEIGHTS_INDEX_NAME}"
    )


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
    """The :class:`MambaLMConfig` of a transformers Mamba/Mamba2 directory (or config.json)."""
    path = Path(path)
    cfg_file = path / CONFIG_NAME if path.is_dir() else path
    return config_from_hf(decode_special_floats(json.loads(cfg_file.read_text())))


def read_hf(path: str | Path) -> tuple[MambaLMConfig, dict[str, torch.Tensor]]:
    """(config, state dict in mamba_ssm key names) of a transformers Mamba/Mamba2 directory.

    Reads the files directly (no transformers model is built, so nothing re-initialises the
    tensors): every returned tensor is exactly what the file holds.
    """
    path = Path(path)
    cfg = read_hf_config(path)
    state = from_hf_state_dict(cfg, _read_weight_files(path), source=str(path))
    return cfg, state
