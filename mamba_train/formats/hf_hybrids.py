"""transformers' hybrid SSM families <-> mamba_train: Nemotron-H (dense), Bamba, Falcon-H1.

Each family is a :class:`Family`: its ``model_type`` and class name, the config mapping both ways
(``from_hf`` / ``to_hf``, the latter refusing with an :class:`ExportError` naming the field
whatever the family cannot hold) and where each of our blocks' sublayers lives in its state dict
(``layout``). The maths each mapping relies on was read in transformers 5.x
``models/{nemotron_h,bamba,falcon_h1}/modeling_*.py``:

* Nemotron-H: one pre-norm residual sublayer per ``layers_block_type`` entry (``norm`` then
  ``mixer``: Mamba-2, attention without positional encoding, or a squared-ReLU MLP); our blocks
  group a mixer with the MLP after it, so its sublayer ``s`` is our block's mixer or MLP.
* Bamba: every layer a Mamba-2 or attention mixer (rotary on half the head) then a SwiGLU MLP.
* Falcon-H1: every layer Mamba-2 and attention in parallel (``P``), then a SwiGLU MLP, with
  µP multipliers; its ``mup_vector`` is our ``multipliers.ssm_zxbcdt``.

The Mamba-2 parameters have the same names and layouts on both sides ([z, x, B, C, dt] in_proj,
per-head dt_bias/A_log/D); attention q/k/v are one ``in_proj`` here, the SwiGLU gate/up one
``fc1`` ([up, gate]). Tensors are only concatenated and split, so a round trip is bit-exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

from mamba_train.formats.hf_family import ExportError, HFFamily, special_token_ids
from mamba_train.models.config import ConfigError, MambaLMConfig
from mamba_train.models.pattern import pattern_of

STATE_PREFIXES = ("model.", "backbone.")  # transformers 5 writes model.; NVIDIA's files backbone.


@dataclass(frozen=True)
class Family:
    """One hybrid family: config both ways (``to_hf`` refuses what it cannot hold) and where our
    blocks' sublayers live in its state dict; :func:`as_hf_family` registers it."""

    model_type: str
    architecture: str
    config_class: str
    from_hf: Callable[[Mapping[str, Any]], MambaLMConfig]
    to_hf: Callable[[MambaLMConfig], dict[str, Any]]
    layout: Callable[[MambaLMConfig], list[tuple[str, str, str]]]
    ssm_layer: str = "Mamba2"


def _refuse(family: str, field: str, why: str) -> ExportError:
    return ExportError(f"{field}: {why}; transformers' {family} cannot represent it")


# ------------------------------------------------------------------------------ shared pieces
def _mamba2_from(d_model: int, heads: int, head_dim: int, **ssm: Any) -> dict[str, Any]:
    d_inner = heads * head_dim
    out = dict(layer="Mamba2", headdim=head_dim, A_init="arange", **ssm)
    if d_inner % d_model == 0:
        out["expand"] = d_inner // d_model
    else:
        out["d_inner"] = d_inner
    return out


def _d_inner(cfg: MambaLMConfig) -> int:
    kw = cfg.mixer_kwargs()
    return int(kw.get("d_inner") or kw["expand"] * cfg.d_model)


def _check_mamba2(cfg: MambaLMConfig, family: str, norm_eps: float | None,
                  norm_before_gate: bool | None = False, rmsnorm: bool | None = None
                  ) -> dict[str, Any]:
    """The mixer's kwargs after refusing what the family's Mamba-2 cannot hold (``rmsnorm``,
    ``norm_before_gate``: the gated norm the family has; None: either)."""
    if not cfg.n_ssm_layers:
        return cfg.mixer_kwargs()
    if cfg.layer != "Mamba2":
        raise _refuse(family, f"model.ssm_cfg.layer={cfg.layer}", "its SSM mixer is Mamba-2")
    kw = cfg.mixer_kwargs()
    if kw["d_ssm"] is not None and kw["d_ssm"] != _d_inner(cfg):
        raise _refuse(family, f"model.ssm_cfg.d_ssm={kw['d_ssm']}", "no gated-MLP part in in_proj")
    if rmsnorm is not None and bool(kw["rmsnorm"]) != rmsnorm:
        raise _refuse(family, f"model.ssm_cfg.rmsnorm={str(bool(kw['rmsnorm'])).lower()}",
                      f"its Mamba-2 {'has' if rmsnorm else 'has no'} gated norm")
    if kw["D_has_hdim"]:
        raise _refuse(family, "model.ssm_cfg.D_has_hdim=true", "D is one value per head")
    if norm_before_gate is not None and kw["rmsnorm"] and kw["norm_before_gate"] != norm_before_gate:
        raise _refuse(family, f"model.ssm_cfg.norm_before_gate={kw['norm_before_gate']}",
                      f"its gated norm has norm_before_gate={norm_before_gate}")
    if norm_eps is not None and kw["rmsnorm"] and float(kw.get("norm_eps", 1e-5)) != norm_eps:
        raise _refuse(family, f"model.ssm_cfg.norm_eps={kw.get('norm_eps', 1e-5)}",
                      f"its gated norm uses the block norms' eps {norm_eps}")
    return kw


def _check_common(cfg: MambaLMConfig, family: str, allowed: set[str], mlp_act: str) -> None:
    if not cfg.rms_norm:
        raise _refuse(family, "model.rms_norm=false", "its norms are RMSNorm")
    bad = {b.symbols for b in cfg.blocks} - allowed
    if bad:
        shown = cfg.layer_pattern or f"{pattern_of(cfg.blocks)} (from attn_layer_idx, d_intermediate)"
        raise _refuse(family, f"model.layer_pattern={shown}",
                      f"its blocks are {sorted(allowed)}, not {sorted(bad)}")
    mlp = cfg.mlp_kwargs()
    if any(b.mlp and not b.moe for b in cfg.blocks):  # experts: the family's own check
        if mlp["act"] != mlp_act:
            raise _refuse(family, f"model.mlp_cfg.act={mlp['act']}", f"its MLP is {mlp_act}")
        if cfg.d_intermediate % mlp["multiple_of"]:
            raise _refuse(family, f"model.mlp_cfg.multiple_of={mlp['multiple_of']}",
                          f"the MLP width would not be d_intermediate={cfg.d_intermediate}")
    if cfg.n_attention_layers:
        a = cfg.attn_kwargs()
        if a["d_conv"] or a["mlp_dim"] or a["rotary_emb_interleaved"]:
            raise _refuse(family, "model.attn_cfg (d_conv, mlp_dim or rotary_emb_interleaved)",
                          "its attention is plain q/k/v/o projections with GPT-NeoX rotary")
        if (a["softmax_scale"] is not None and a["softmax_scale"] != _head_dim(cfg) ** -0.5
                and family != "GraniteMoeHybridForCausalLM"):  # its attention_multiplier
            raise _refuse(family, f"model.attn_cfg.softmax_scale={a['softmax_scale']}",
                          "it scales scores by head_dim**-0.5")
        if a["qkv_proj_bias"] != a["out_proj_bias"]:
            raise _refuse(family, "model.attn_cfg.qkv_proj_bias != out_proj_bias",
                          "one attention_bias flag covers q, k, v and o")
    used = {k for k, v in cfg.multipliers.items()
            if v != (1.0 if k != "ssm_zxbcdt" else (1.0,) * 5)}
    if used and family not in ("FalconH1ForCausalLM", "GraniteMoeHybridForCausalLM"):
        raise _refuse(family, f"model.multipliers {sorted(used)}", "it has no µP multipliers")


def _head_dim(cfg: MambaLMConfig) -> int:
    a = cfg.attn_kwargs()
    return a["head_dim"] or cfg.d_model // a["num_heads"]


def _vocab(raw: Mapping[str, Any]) -> dict[str, Any]:
    vocab = int(raw["vocab_size"])
    return dict(vocab_size=vocab, pad_vocab_size_multiple=8 if vocab % 8 == 0 else 1)


def _build(raw: Mapping[str, Any], **fields: Any) -> MambaLMConfig:
    try:
        return MambaLMConfig(**_vocab(raw), special_token_ids=special_token_ids(raw), **fields)
    except ConfigError as e:
        raise ExportError(f"config.json describes a model mamba_train cannot build: {e}") from e


def _common_out(cfg: MambaLMConfig) -> dict[str, Any]:
    init = cfg.initializer_cfg
    return dict(hidden_size=cfg.d_model, vocab_size=cfg.padded_vocab_size,
                tie_word_embeddings=bool(cfg.tie_embeddings),
                initializer_range=float(init.get("initializer_range", 0.02)))


def _attn_out(cfg: MambaLMConfig) -> dict[str, Any]:
    if not cfg.n_attention_layers:
        return {}
    a = cfg.attn_kwargs()
    return dict(num_attention_heads=a["num_heads"],
                num_key_value_heads=a["num_heads_kv"] or a["num_heads"],
                head_dim=_head_dim(cfg), attention_bias=bool(a["qkv_proj_bias"]))


# ------------------------------------------------------------------------------ state dicts
def _split_attn(prefix_ours: str, prefix_theirs: str, state, cfg, out) -> None:
    a = cfg.attn_kwargs()
    hd, h, kv = _head_dim(cfg), a["num_heads"], a["num_heads_kv"] or a["num_heads"]
    sizes = [h * hd, kv * hd, kv * hd]
    for suffix in ("weight", "bias"):
        t = state.get(f"{prefix_ours}.in_proj.{suffix}")
        if t is not None:
            for name, part in zip("qkv", t.split(sizes, 0)):
                out[f"{prefix_theirs}.{name}_proj.{suffix}"] = part
        t = state.get(f"{prefix_ours}.out_proj.{suffix}")
        if t is not None:
            out[f"{prefix_theirs}.o_proj.{suffix}"] = t


def _join_attn(prefix_ours: str, prefix_theirs: str, state, out) -> None:
    for suffix in ("weight", "bias"):
        parts = [state.get(f"{prefix_theirs}.{n}_proj.{suffix}") for n in "qkv"]
        if all(p is not None for p in parts):
            out[f"{prefix_ours}.in_proj.{suffix}"] = torch.cat(parts, 0)
        if f"{prefix_theirs}.o_proj.{suffix}" in state:
            out[f"{prefix_ours}.out_proj.{suffix}"] = state[f"{prefix_theirs}.o_proj.{suffix}"]


# layout kinds that other modules define (formats/hf_moe_*.py: the experts sublayers):
# kind -> convert(ours, theirs, state, out, to_hf, cfg)
SUBLAYER_CONVERTERS: dict[str, Callable[..., None]] = {}


def _convert(kind: str, ours: str, theirs: str, state, cfg, out, to_hf: bool) -> None:
    src, dst = (ours, theirs) if to_hf else (theirs, ours)
    if kind in ("norm", "ssm", "top"):  # same parameter names on both sides
        for name, t in state.items():
            if name.startswith(src + "."):
                out[dst + name[len(src):]] = t
    elif kind == "attn":
        (_split_attn(ours, theirs, state, cfg, out) if to_hf else _join_attn(ours, theirs, state, out))
    elif kind == "relu2":
        pairs = (("fc1", "up_proj"), ("fc2", "down_proj"))
        for a, b in pairs:
            for suffix in ("weight", "bias"):
                s_name = f"{src}.{a if to_hf else b}.{suffix}"
                if s_name in state:
                    out[f"{dst}.{b if to_hf else a}.{suffix}"] = state[s_name]
    elif kind == "swiglu":
        for suffix in ("weight", "bias"):
            if to_hf:
                if f"{ours}.fc1.{suffix}" in state:
                    up, gate = state[f"{ours}.fc1.{suffix}"].chunk(2, 0)
                    out[f"{theirs}.up_proj.{suffix}"], out[f"{theirs}.gate_proj.{suffix}"] = up, gate
                if f"{ours}.fc2.{suffix}" in state:
                    out[f"{theirs}.down_proj.{suffix}"] = state[f"{ours}.fc2.{suffix}"]
            else:
                if f"{theirs}.up_proj.{suffix}" in state:
                    out[f"{ours}.fc1.{suffix}"] = torch.cat(
                        [state[f"{theirs}.up_proj.{suffix}"], state[f"{theirs}.gate_proj.{suffix}"]])
                if f"{theirs}.down_proj.{suffix}" in state:
                    out[f"{ours}.fc2.{suffix}"] = state[f"{theirs}.down_proj.{suffix}"]
    elif kind in SUBLAYER_CONVERTERS:
        SUBLAYER_CONVERTERS[kind](ours, theirs, state, out, to_hf, cfg)
    else:
        raise AssertionError(kind)


def state_to_hf(cfg: MambaLMConfig, family: Family,
                state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our tensors -> the family's names. Nemotron-H keeps its own head even when the flag says
    tied (transformers never ties it), so a tied model writes the embedding there too."""
    if cfg.tie_embeddings and family.model_type == "nemotron_h":
        state = {**state, "lm_head.weight": state["backbone.embedding.weight"]}
    out: dict[str, torch.Tensor] = {}
    for kind, ours, theirs in family.layout(cfg):
        _convert(kind, ours, theirs, state, cfg, out, to_hf=True)
    return out


def state_from_hf(cfg: MambaLMConfig, family: Family,
                  state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The family's tensors -> ours. NVIDIA's Nemotron-H files name the base model ``backbone.``
    where transformers 5 writes ``model.``; both are read."""
    state = {_model_prefix(k): v for k, v in state.items()}
    if family.model_type == "nemotron_h" and cfg.tie_embeddings:
        head, emb = state.get("lm_head.weight"), state.get("model.embeddings.weight")
        if head is not None and emb is not None and not torch.equal(head, emb):
            # transformers' NemotronHForCausalLM never ties: it computes with the head it reads
            cfg.tie_embeddings = False
    out: dict[str, torch.Tensor] = {}
    for kind, ours, theirs in family.layout(cfg):
        _convert(kind, ours, theirs, state, cfg, out, to_hf=False)
    return out


def _model_prefix(key: str) -> str:
    for prefix in ("model.backbone.", "backbone."):  # the registry prepends model. to bare keys
        if key.startswith(prefix):
            return "model." + key[len(prefix):]
    return key


def is_hybrid(cfg: MambaLMConfig) -> bool:
    """Whether transformers' Mamba/Mamba2 classes cannot hold ``cfg`` for being a hybrid (an
    MLP, attention or a layer pattern): the configs these families claim."""
    return bool(cfg.layer_pattern or cfg.attn_layer_idx or cfg.d_intermediate)


def as_hf_family(family: Family) -> HFFamily:
    """The registry entry (``formats/hf.py``) of a hybrid family."""
    def config_fields(cfg: MambaLMConfig) -> dict[str, Any]:
        fields = family.to_hf(cfg)
        fields.pop("model_type")
        return fields

    return HFFamily(
        model_type=family.model_type, architecture=family.architecture,
        config_class=family.config_class, claims=is_hybrid, config_fields=config_fields,
        from_config=family.from_hf, base_model_prefix="model", ssm_layer=family.ssm_layer,
        layered=True,
        state_to_hf=lambda cfg, state: state_to_hf(cfg, family, state),
        state_from_hf=lambda cfg, state: state_from_hf(cfg, family, state))
