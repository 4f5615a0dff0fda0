"""transformers' Mamba and Mamba-2 families (``MambaForCausalLM`` / ``Mamba2ForCausalLM``):
their config fields both ways, and the one state-dict rename. Registered in ``formats/hf.py``.

* Export refuses with an :class:`ExportError` naming the field whatever transformers' modules
  cannot compute (MLPs, attention layers, LayerNorm, Mamba-2 variants without the gated RMSNorm,
  Mamba-3, ...).
* State-dict names differ in one place only: mamba_ssm's ``backbone.embedding.weight`` is
  transformers' ``backbone.embeddings.weight``; every mixer / norm name is the same.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from mamba_train.formats.hf_family import ExportError, HFFamily, special_token_ids
from mamba_train.models.config import ConfigError, MambaLMConfig
from mamba_train.models.mixer_tables import (MAMBA1_DEFAULTS, MAMBA2_DEFAULTS,
                                             MAMBA2_EXTENSION_DEFAULTS)

# mamba_ssm's Mamba2 builds its gated RMSNorm with a hard-coded eps 1e-5 (modules/mamba2.py);
# transformers' Mamba2Mixer uses config.layer_norm_epsilon for it: our ssm_cfg.norm_eps.
_MAMBA2_DEFAULTS = {**MAMBA2_DEFAULTS, **MAMBA2_EXTENSION_DEFAULTS}

# Our init defaults (models/init.py) for the two initializer_cfg keys HF has fields for.
_INIT_DEFAULTS = {"initializer_range": 0.02, "rescale_prenorm_residual": True}

# mamba_ssm name -> transformers name (prefix rewrites; everything else is identical)
RENAMES = (("backbone.embedding.", "backbone.embeddings."),)


def check_representable(cfg: MambaLMConfig) -> None:
    """Raise :class:`ExportError` naming the first field transformers' Mamba models cannot hold.

    transformers 5.x ``MambaBlock`` / ``Mamba2Block`` are ``RMSNorm -> mixer -> add`` with no
    MLP, no attention, RMSNorm only; ``Mamba2Mixer`` always applies the gated RMSNorm with the
    gate *before* the norm (``norm_before_gate=False``), over the full inner width, with a
    per-head ``D``, and reads its eps from ``layer_norm_epsilon`` (our ``ssm_cfg.norm_eps``).
    """
    cant = "transformers' {cls} cannot represent it"
    cls = (MAMBA if cfg.layer == "Mamba1" else MAMBA2).architecture
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
    if cfg.n_attention_layers or cfg.n_moe_layers or any(b.mlp for b in cfg.blocks):
        raise ExportError(
            f"model.layer_pattern={cfg.layer_pattern}: attention, MLP or mixture-of-experts "
            f"sublayers; {cant.format(cls=cls)}, its blocks are the SSM mixer alone")
    if not cfg.rms_norm:
        raise ExportError(
            f"model.rms_norm=False (LayerNorm): {cant.format(cls=cls)}, its blocks and final "
            "norm are RMSNorm only"
        )
    kw = cfg.mixer_kwargs()
    if kw.get("d_inner"):  # Mamba-2's explicit width: transformers has expand * hidden_size only
        if cfg.ssm_d_inner % cfg.d_model:
            raise ExportError(
                f"model.ssm_cfg.d_inner={cfg.ssm_d_inner} is not a multiple of "
                f"d_model={cfg.d_model}: transformers' mixer width is an integer expand times "
                f"hidden_size; {cant.format(cls=cls)}")
    elif not isinstance(kw["expand"], int) or isinstance(kw["expand"], bool):
        raise ExportError(
            f"model.ssm_cfg.expand={kw['expand']!r}: transformers' config needs an integer expand"
        )
    if cfg.layer == "Mamba1":
        if kw["dt_bc_norm"]:
            raise ExportError(
                "model.ssm_cfg.dt_bc_norm=true: transformers' MambaMixer has no dt/B/C norms "
                f"(JambaForCausalLM has, with an MLP after each mixer); {cant.format(cls=cls)}")
        if kw["dt_init"] not in ("random", "constant"):
            raise ExportError(f"model.ssm_cfg.dt_init={kw['dt_init']!r} is not 'random'/'constant'")
        return
    d_inner = cfg.ssm_d_inner
    if kw["d_ssm"] is not None and kw["d_ssm"] != d_inner:
        raise ExportError(
            f"model.ssm_cfg.d_ssm={kw['d_ssm']} != the inner width {d_inner}: a Mamba-2 mixer with "
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
    norm_eps = kw.get("norm_eps", MAMBA2_EXTENSION_DEFAULTS["norm_eps"])
    if norm_eps != cfg.norm_epsilon:
        raise ExportError(
            f"model.ssm_cfg.norm_eps={norm_eps} != model.norm_epsilon={cfg.norm_epsilon}: "
            f"transformers' Mamba2 has one layer_norm_epsilon for the block norms and the mixer's "
            f"gated RMSNorm; {cant.format(cls=cls)}"
        )


def config_fields(cfg: MambaLMConfig) -> dict[str, Any]:
    """The transformers config fields (name -> value) that describe ``cfg``; checks first."""
    check_representable(cfg)
    kw = cfg.mixer_kwargs()
    init_cfg = {**_INIT_DEFAULTS, **cfg.initializer_cfg}
    fields: dict[str, Any] = dict(
        hidden_size=cfg.d_model,
        num_hidden_layers=cfg.n_layer,
        vocab_size=cfg.padded_vocab_size,  # the embedding's real size
        state_size=kw["d_state"],
        expand=cfg.ssm_d_inner // cfg.d_model,
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
        fields.update(
            num_heads=cfg.ssm_d_inner // kw["headdim"],
            head_dim=kw["headdim"],
            n_groups=kw["ngroups"],
            chunk_size=kw["chunk_size"],
            time_step_limit=[float(v) for v in kw["dt_limit"]],
        )
    return fields


def _get(raw: Mapping[str, Any], key: str, defaults: Any) -> Any:
    return raw[key] if key in raw else getattr(defaults, key)


def _from_config(raw: Mapping[str, Any], model_type: str) -> MambaLMConfig:
    """A :class:`MambaLMConfig` from a transformers Mamba/Mamba2 ``config.json`` dict.

    Missing keys take transformers' class defaults. The vocabulary is the embedding size, with
    ``pad_vocab_size_multiple`` 8 when it divides it (so the padded size is unchanged) else 1.
    """
    import transformers

    defaults = getattr(transformers, (MAMBA if model_type == "mamba" else MAMBA2).config_class)
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
            # transformers' gated RMSNorm reads layer_norm_epsilon too (mamba_ssm fixes 1e-5)
            norm_eps=float(g("layer_norm_epsilon")),
        )
        ssm.update({k: v for k, v in values.items() if _MAMBA2_DEFAULTS[k] != v})
    init_cfg = {k: type(d)(g(k)) for k, d in _INIT_DEFAULTS.items() if type(d)(g(k)) != d}
    try:
        return MambaLMConfig(
            d_model=d_model, n_layer=int(g("num_hidden_layers")), vocab_size=vocab,
            pad_vocab_size_multiple=8 if vocab % 8 == 0 else 1, ssm_cfg=ssm,
            rms_norm=True, residual_in_fp32=bool(g("residual_in_fp32")),
            tie_embeddings=bool(g("tie_word_embeddings")),
            norm_epsilon=float(g("layer_norm_epsilon")), initializer_cfg=init_cfg,
            special_token_ids=special_token_ids(raw),
        )
    except ConfigError as e:
        raise ExportError(f"config.json describes an invalid model: {e}") from e


MAMBA = HFFamily(
    model_type="mamba", architecture="MambaForCausalLM", config_class="MambaConfig",
    claims=lambda cfg: cfg.layer == "Mamba1", config_fields=config_fields, ssm_layer="Mamba1",
    from_config=lambda raw: _from_config(raw, "mamba"), renames=RENAMES)
MAMBA2 = HFFamily(
    model_type="mamba2", architecture="Mamba2ForCausalLM", config_class="Mamba2Config",
    claims=lambda cfg: cfg.layer == "Mamba2", config_fields=config_fields,
    from_config=lambda raw: _from_config(raw, "mamba2"), renames=RENAMES)
FAMILIES = (MAMBA, MAMBA2)
