"""The three transformers hybrid families as :class:`~mamba_train.formats.hf_hybrids.Family`
entries: config both ways and the state-dict layout (see ``hf_hybrids.py`` for the maths)."""

from __future__ import annotations

from typing import Any, Mapping

from mamba_train.formats.hf_family import ExportError
from mamba_train.formats.hf_hybrids import (
    Family, _attn_out, _build, _check_common, _check_mamba2, _common_out, _d_inner, _head_dim,
    _mamba2_from, _refuse, as_hf_family)
from mamba_train.models.config import MambaLMConfig
from mamba_train.formats import hf_moe_nemotron
from mamba_train.models.pattern import ATTENTION, MLP, MOE, PARALLEL, SSM, pattern_of

NEMOTRON_H, BAMBA, FALCON_H1 = "NemotronHForCausalLM", "BambaForCausalLM", "FalconH1ForCausalLM"


def _hf_config(model_type: str, raw: Mapping[str, Any]):
    import transformers

    cls = transformers.AutoConfig.for_model(model_type).__class__
    fields = {k: v for k, v in raw.items() if k not in ("model_type", "transformers_version")}
    return cls(**fields)


def _silu_config(model_type: str, raw: Mapping[str, Any], family: str):
    """``_hf_config`` of a family whose gated MLPs (and experts) are implemented with SiLU only."""
    c = _hf_config(model_type, raw)
    if c.hidden_act != "silu":
        raise ExportError(f"config.json hidden_act={c.hidden_act!r}: {family} with an activation "
                          "other than silu is not implemented")
    return c


def _eps(c) -> float:
    return float(getattr(c, "rms_norm_eps", None) or c.layer_norm_epsilon)


def _rope(c, head_dim: int, partial: bool) -> dict[str, Any]:
    """Rotary kwargs of the family's default RoPE. ``partial``: the family's rotary embedding
    honours ``partial_rotary_factor`` (Bamba; BambaConfig fills in 0.5); Falcon-H1's and Granite's
    compute their frequencies over the whole head whatever the field says."""
    rope = dict(getattr(c, "rope_parameters", None) or {})
    if rope.get("rope_type", "default") != "default":
        raise ExportError(f"config.json rope_type={rope['rope_type']!r}: only the default RoPE "
                          "is implemented")
    factor = float(rope.get("partial_rotary_factor", 1.0)) if partial else 1.0
    if int(head_dim * factor) % 2:
        raise ExportError(f"config.json partial_rotary_factor={factor} of head_dim={head_dim}: an "
                          f"odd rotary width ({int(head_dim * factor)}) is not implemented")
    return dict(rotary_emb_dim=int(head_dim * factor),
                rotary_emb_base=float(rope.get("rope_theta", 10000.0)))


def _attn_in(c, head_dim: int, bias: bool, rope: dict | None) -> dict[str, Any]:
    return dict(num_heads=c.num_attention_heads, num_heads_kv=c.num_key_value_heads,
                head_dim=head_dim, qkv_proj_bias=bias, out_proj_bias=bias, causal=True,
                **(rope or {}))


# ------------------------------------------------------------------------------ Nemotron-H
def _nemotron_from(raw: Mapping[str, Any]) -> MambaLMConfig:
    c = _hf_config("nemotron_h", raw)
    sub = c.hybrid_override_pattern
    if set(sub) - {SSM, ATTENTION, MLP, MOE}:
        raise ExportError(f"config.json pattern {sub!r}: Nemotron-H layers are M, *, - and E")
    if c.mamba_hidden_act != "silu" or c.mlp_hidden_act != "relu2":
        raise ExportError("config.json: Nemotron-H with mamba_hidden_act != silu or "
                          "mlp_hidden_act != relu2 is not implemented")
    d, eps = c.hidden_size, _eps(c)
    ssm = _mamba2_from(d, c.mamba_num_heads, c.mamba_head_dim, d_state=c.ssm_state_size,
                       d_conv=c.conv_kernel, ngroups=c.n_groups, chunk_size=c.chunk_size,
                       dt_min=c.time_step_min, dt_max=c.time_step_max,
                       dt_init_floor=c.time_step_floor, dt_limit=tuple(c.time_step_limit),
                       conv_bias=c.use_conv_bias, bias=c.use_bias, norm_eps=eps)
    # transformers' NemotronHAttention builds q/k/v/o without biases whatever attention_bias says
    attn = _attn_in(c, c.head_dim, False, None) if ATTENTION in sub else {}
    from mamba_train.models.pattern import parse_pattern
    return _build(raw, d_model=d, n_layer=len(parse_pattern(sub)), layer_pattern=sub,
                  d_intermediate=c.intermediate_size if MLP in sub else 0, ssm_cfg=ssm,
                  attn_cfg=attn, mlp_cfg=dict(act="relu2", bias=c.mlp_bias, multiple_of=1),
                  residual_in_fp32=c.residual_in_fp32, tie_embeddings=c.tie_word_embeddings,
                  norm_epsilon=eps, initializer_cfg=dict(initializer_range=c.initializer_range),
                  moe_cfg=hf_moe_nemotron.moe_cfg_from(c) if MOE in sub else {})


def _nemotron_to(cfg: MambaLMConfig) -> dict[str, Any]:
    _check_common(cfg, NEMOTRON_H, {"M", "*", "-", "M-", "*-", "E", "ME", "*E"}, "relu2")
    kw = _check_mamba2(cfg, NEMOTRON_H, norm_eps=cfg.norm_epsilon, rmsnorm=True)
    if cfg.n_attention_layers:
        a = cfg.attn_kwargs()
        if a["rotary_emb_dim"]:
            raise _refuse(NEMOTRON_H, f"model.attn_cfg.rotary_emb_dim={a['rotary_emb_dim']}",
                          "its attention has no positional encoding")
        if a["qkv_proj_bias"] or a["out_proj_bias"]:
            raise _refuse(NEMOTRON_H, "model.attn_cfg.qkv_proj_bias/out_proj_bias",
                          "its attention projections have no bias")
    sub = pattern_of(cfg.blocks)
    names = {SSM: "linear_attention", ATTENTION: "full_attention", MLP: "mlp", MOE: "moe"}
    out = dict(model_type="nemotron_h", layers_block_type=[names[s] for s in sub],
               layer_norm_epsilon=float(cfg.norm_epsilon), residual_in_fp32=cfg.residual_in_fp32,
               rescale_prenorm_residual=False, mlp_hidden_act="relu2", mamba_hidden_act="silu",
               **_common_out(cfg), **_attn_out(cfg))
    if cfg.d_intermediate:
        out.update(intermediate_size=cfg.d_intermediate, mlp_bias=bool(cfg.mlp_kwargs()["bias"]))
    if cfg.n_moe_layers:
        out.update(hf_moe_nemotron.moe_fields(cfg))
    if cfg.n_ssm_layers:
        d_inner = _d_inner(cfg)
        out.update(mamba_num_heads=d_inner // kw["headdim"], mamba_head_dim=kw["headdim"],
                   n_groups=kw["ngroups"], ssm_state_size=kw["d_state"], conv_kernel=kw["d_conv"],
                   chunk_size=kw["chunk_size"], time_step_min=float(kw["dt_min"]),
                   time_step_max=float(kw["dt_max"]), time_step_floor=float(kw["dt_init_floor"]),
                   time_step_limit=[float(v) for v in kw["dt_limit"]],
                   use_conv_bias=bool(kw["conv_bias"]), use_bias=bool(kw["bias"]),
                   mamba_proj_bias=bool(kw["bias"]))
        if d_inner % cfg.d_model == 0:
            out["expand"] = d_inner // cfg.d_model
    return out


def _nemotron_layout(cfg: MambaLMConfig) -> list[tuple[str, str, str]]:
    out = [("top", "backbone.embedding", "model.embeddings"), ("top", "backbone.norm_f", "model.norm_f"),
           ("top", "lm_head", "lm_head")]
    s = 0
    for b, spec in enumerate(cfg.blocks):
        ours = f"backbone.layers.{b}"
        if spec.mixer is not None:
            kind = "ssm" if spec.mixer == SSM else "attn"
            out += [("norm", f"{ours}.norm", f"model.layers.{s}.norm"),
                    (kind, f"{ours}.mixer", f"model.layers.{s}.mixer")]
            s += 1
        if spec.mlp:
            norm = "norm2" if spec.mixer is not None else "norm"
            out += [("norm", f"{ours}.{norm}", f"model.layers.{s}.norm"),
                    ("moe_nemotron" if spec.moe else "relu2", f"{ours}.mlp",
                     f"model.layers.{s}.mixer")]
            s += 1
    return out


# ------------------------------------------------------------------------------ Bamba
def _bamba_from(raw: Mapping[str, Any]) -> MambaLMConfig:
    c = _silu_config("bamba", raw, "Bamba")
    if c.z_loss_coefficient:
        raise ExportError(f"config.json z_loss_coefficient={c.z_loss_coefficient}: mamba_train's "
                          "loss has no z-loss term; set it to 0 to train this model here")
    d, eps = c.hidden_size, _eps(c)
    attn_idx = set(c.attn_layer_indices or [])
    pattern = "".join("*-" if i in attn_idx else "M-" for i in range(c.num_hidden_layers))
    head_dim = getattr(c, "head_dim", None) or d // c.num_attention_heads
    ssm = _mamba2_from(d, c.mamba_n_heads, c.mamba_d_head, d_state=c.mamba_d_state,
                       d_conv=c.mamba_d_conv, ngroups=c.mamba_n_groups,
                       chunk_size=c.mamba_chunk_size, dt_limit=tuple(c.time_step_limit),
                       conv_bias=c.mamba_conv_bias, bias=c.mamba_proj_bias, norm_eps=eps,
                       dt_bias_init=1.0)
    attn = _attn_in(c, head_dim, c.attention_bias, _rope(c, head_dim, partial=True)) if attn_idx else {}
    return _build(raw, d_model=d, n_layer=c.num_hidden_layers, layer_pattern=pattern,
                  d_intermediate=c.intermediate_size, ssm_cfg=ssm, attn_cfg=attn,
                  mlp_cfg=dict(act="swiglu", bias=c.mlp_bias, multiple_of=1),
                  residual_in_fp32=False, tie_embeddings=c.tie_word_embeddings, norm_epsilon=eps,
                  initializer_cfg=dict(initializer_range=c.initializer_range),
                  padding_idx=c.pad_token_id)  # its nn.Embedding's padding_idx


def _mamba2_out(cfg: MambaLMConfig, kw: dict[str, Any], family: str,
                expand: bool = True) -> dict[str, Any]:
    """The ``mamba_*`` fields of Bamba, Falcon-H1 and Granite, with ``mamba_expand`` unless the
    family sizes the mixer by ``mamba_d_ssm``. A model without SSM layers whose mixer settings
    they cannot hold (a Mamba-1 ``ssm_cfg``, a width no integer ``mamba_expand`` gives) gets a
    one-head set: the config class validates the fields though no layer is built from them."""
    d_inner = _d_inner(cfg)
    if not cfg.n_ssm_layers and (cfg.layer != "Mamba2" or (expand and d_inner % cfg.d_model)):
        return dict(mamba_n_heads=1, mamba_d_head=cfg.d_model, **(dict(mamba_expand=1) if expand
                                                                   else {}))
    out = dict(mamba_n_heads=d_inner // kw["headdim"], mamba_d_head=kw["headdim"],
               mamba_n_groups=kw["ngroups"], mamba_d_state=kw["d_state"],
               mamba_d_conv=kw["d_conv"], mamba_chunk_size=kw["chunk_size"],
               mamba_conv_bias=bool(kw["conv_bias"]), mamba_proj_bias=bool(kw["bias"]),
               time_step_limit=[float(v) for v in kw["dt_limit"]])
    if expand:
        if d_inner % cfg.d_model:
            raise _refuse(family, f"Mamba-2 inner width {d_inner}",
                          "it is mamba_expand * hidden_size with an integer mamba_expand")
        out["mamba_expand"] = d_inner // cfg.d_model
    return out


def _bamba_to(cfg: MambaLMConfig) -> dict[str, Any]:
    _check_common(cfg, BAMBA, {"M-", "*-"}, "swiglu")
    kw = _check_mamba2(cfg, BAMBA, norm_eps=cfg.norm_epsilon, rmsnorm=True)
    out = dict(model_type="bamba", num_hidden_layers=cfg.n_layer, rms_norm_eps=cfg.norm_epsilon,
               intermediate_size=cfg.d_intermediate, hidden_act="silu",
               mlp_bias=bool(cfg.mlp_kwargs()["bias"]),
               attn_layer_indices=[i for i, b in enumerate(cfg.blocks) if b.mixer == ATTENTION],
               **_mamba2_out(cfg, kw, BAMBA), **_common_out(cfg), **_attn_out(cfg))
    if cfg.n_attention_layers:
        a, head_dim = cfg.attn_kwargs(), _head_dim(cfg)
        factor = a["rotary_emb_dim"] / head_dim  # its RoPE covers int(head_dim * factor) dims
        if not a["rotary_emb_dim"] or int(head_dim * factor) != a["rotary_emb_dim"]:
            raise _refuse(BAMBA, f"model.attn_cfg.rotary_emb_dim={a['rotary_emb_dim']}",
                          "its rotary embedding covers int(head_dim * partial_rotary_factor) > 0 "
                          "dims")
        out["rope_parameters"] = dict(rope_type="default", rope_theta=float(a["rotary_emb_base"]),
                                      partial_rotary_factor=factor)
    return out


def _decoder_top(final_norm: str) -> list[tuple[str, str, str]]:
    """Embedding, final norm and head of a transformers decoder (``model.embed_tokens``...)."""
    return [("top", "backbone.embedding", "model.embed_tokens"),
            ("top", "backbone.norm_f", f"model.{final_norm}"), ("top", "lm_head", "lm_head")]


def _decoder_block_norms(b: int, second_norm: str) -> tuple[str, str, list[tuple[str, str, str]]]:
    """Block ``b``'s module prefixes (ours, theirs) and its ``input_layernorm`` + second norm."""
    ours, theirs = f"backbone.layers.{b}", f"model.layers.{b}"
    return ours, theirs, [("norm", f"{ours}.norm", f"{theirs}.input_layernorm"),
                          ("norm", f"{ours}.norm2", f"{theirs}.{second_norm}")]


def _decoder_layout(cfg: MambaLMConfig) -> list[tuple[str, str, str]]:
    """Bamba's and Falcon-H1's ``input_layernorm`` -> mixer(s) -> ``pre_ff_layernorm`` ->
    ``feed_forward`` layers, one per block."""
    out = _decoder_top("final_layernorm")
    for b, spec in enumerate(cfg.blocks):
        ours, theirs, norms = _decoder_block_norms(b, "pre_ff_layernorm")
        out += norms + [("swiglu", f"{ours}.mlp", f"{theirs}.feed_forward")]
        if spec.mixer == PARALLEL:
            out += [("ssm", f"{ours}.mixer.ssm", f"{theirs}.mamba"),
                    ("attn", f"{ours}.mixer.attn", f"{theirs}.self_attn")]
        else:
            out.append(("ssm", f"{ours}.mixer", f"{theirs}.mamba") if spec.mixer == SSM
                       else ("attn", f"{ours}.mixer", f"{theirs}.self_attn"))
    return out


# ------------------------------------------------------------------------------ Falcon-H1
_FALCON_MULTIPLIERS = dict(embedding="embedding_multiplier", lm_head="lm_head_multiplier",
                           attn_in="attention_in_multiplier", attn_out="attention_out_multiplier",
                           key="key_multiplier", ssm_in="ssm_in_multiplier",
                           ssm_out="ssm_out_multiplier")


def _falcon_from(raw: Mapping[str, Any]) -> MambaLMConfig:
    c = _silu_config("falcon_h1", raw, "Falcon-H1")
    if c.mamba_proj_bias != c.projectors_bias:
        raise ExportError(f"config.json mamba_proj_bias={c.mamba_proj_bias} (in_proj) != "
                          f"projectors_bias={c.projectors_bias} (out_proj): mamba_train's Mamba-2 "
                          "has one bias flag for both")
    d, eps = c.hidden_size, _eps(c)
    head_dim = getattr(c, "head_dim", None) or d // c.num_attention_heads
    ssm = _mamba2_from(d, c.mamba_n_heads, c.mamba_d_head, d_state=c.mamba_d_state,
                       d_conv=c.mamba_d_conv, ngroups=c.mamba_n_groups,
                       chunk_size=c.mamba_chunk_size, dt_limit=tuple(c.time_step_limit),
                       conv_bias=c.mamba_conv_bias, bias=c.mamba_proj_bias, norm_eps=eps,
                       rmsnorm=bool(c.mamba_rms_norm),
                       norm_before_gate=bool(c.mamba_norm_before_gate), dt_bias_init=1.0)
    mult = {ours: float(getattr(c, theirs)) for ours, theirs in _FALCON_MULTIPLIERS.items()}
    mult["mlp_gate"], mult["mlp_down"] = (float(v) for v in c.mlp_multipliers)
    mult["ssm_zxbcdt"] = tuple(float(v) for v in c.ssm_multipliers)
    return _build(raw, d_model=d, n_layer=c.num_hidden_layers,
                  layer_pattern="P-" * c.num_hidden_layers, d_intermediate=c.intermediate_size,
                  ssm_cfg=ssm, attn_cfg=_attn_in(c, head_dim, c.attention_bias,
                                                 _rope(c, head_dim, partial=False)),
                  mlp_cfg=dict(act="swiglu", bias=c.mlp_bias, multiple_of=1), multipliers=mult,
                  residual_in_fp32=False, tie_embeddings=c.tie_word_embeddings, norm_epsilon=eps,
                  initializer_cfg=dict(initializer_range=c.initializer_range),
                  padding_idx=c.pad_token_id)  # its nn.Embedding's padding_idx


def _falcon_to(cfg: MambaLMConfig) -> dict[str, Any]:
    _check_common(cfg, FALCON_H1, {"P-"}, "swiglu")
    kw = _check_mamba2(cfg, FALCON_H1, norm_eps=cfg.norm_epsilon, norm_before_gate=None)
    a = cfg.attn_kwargs()
    if a["rotary_emb_dim"] != _head_dim(cfg):
        raise _refuse(FALCON_H1, f"model.attn_cfg.rotary_emb_dim={a['rotary_emb_dim']}",
                      f"its rotary embedding covers the whole head ({_head_dim(cfg)})")
    d_inner = _d_inner(cfg)
    out = dict(model_type="falcon_h1", num_hidden_layers=cfg.n_layer,
               rms_norm_eps=cfg.norm_epsilon, intermediate_size=cfg.d_intermediate,
               hidden_act="silu", mlp_bias=bool(cfg.mlp_kwargs()["bias"]), mamba_d_ssm=d_inner,
               mamba_rms_norm=bool(kw["rmsnorm"]), mamba_norm_before_gate=bool(kw["norm_before_gate"]),
               projectors_bias=bool(kw["bias"]),
               rope_parameters=dict(rope_type="default", rope_theta=float(a["rotary_emb_base"])),
               mlp_multipliers=[float(cfg.multiplier("mlp_gate")), float(cfg.multiplier("mlp_down"))],
               ssm_multipliers=[float(v) for v in cfg.multiplier("ssm_zxbcdt")],
               **{theirs: float(cfg.multiplier(ours)) for ours, theirs in _FALCON_MULTIPLIERS.items()},
               **_mamba2_out(cfg, kw, FALCON_H1, expand=False), **_common_out(cfg), **_attn_out(cfg))
    if d_inner % cfg.d_model == 0:
        out["mamba_expand"] = d_inner // cfg.d_model
    return out


FAMILIES = (
    as_hf_family(Family("nemotron_h", NEMOTRON_H, "NemotronHConfig", _nemotron_from,
                        _nemotron_to, _nemotron_layout)),
    as_hf_family(Family("bamba", BAMBA, "BambaConfig", _bamba_from, _bamba_to, _decoder_layout)),
    as_hf_family(Family("falcon_h1", FALCON_H1, "FalconH1Config", _falcon_from, _falcon_to,
                        _decoder_layout)),
)
