"""IBM Granite 4.0-H (transformers' ``GraniteMoeHybridForCausalLM``) <-> mamba_train.

The maths read in transformers 5.x ``models/granitemoehybrid/modeling_granitemoehybrid.py``:
every layer is ``input_layernorm`` -> a Mamba-2 (``mamba``, Bamba's mixer) or attention
(``self_attn``, scores scaled by ``attention_multiplier``, RoPE over the whole head or none) ->
``residual + out * residual_multiplier`` -> ``post_attention_layernorm`` -> the experts
(``block_sparse_moe``: softmax over the top-k router logits, SwiGLU experts) plus a shared SwiGLU
MLP (``shared_mlp``) on the same input -> ``residual + out * residual_multiplier``. Embeddings
are multiplied by ``embedding_multiplier`` and logits divided by ``logits_scaling``.

Here: pattern ``ME``/``*E`` blocks (``M-``/``*-`` with the shared MLP alone when
``num_local_experts=0``), the shared MLP as the experts' ``d_shared``, and the constants as
``multipliers`` (``embedding``, ``lm_head`` = 1/logits_scaling, ``attn_out`` = ``ssm_out`` =
``mlp_down`` = residual_multiplier) with ``attn_cfg.softmax_scale`` = attention_multiplier.
Checkpoints hold ``block_sparse_moe.input_linear`` (E, 2I, D) as [gate, up] (ours: [up, gate]),
``output_linear`` (E, D, I) and ``router.layer``; the round trip only swaps halves.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from mamba_train.formats.hf_hybrid_families import (
    _attn_in, _decoder_block_norms, _decoder_top, _eps, _silu_config, _mamba2_out, _rope)
from mamba_train.formats.hf_hybrids import (
    SUBLAYER_CONVERTERS, Family, _attn_out, as_hf_family, _build, _check_common, _check_mamba2, _common_out, _head_dim,
    _mamba2_from, _refuse)
from mamba_train.models.config import MambaLMConfig
from mamba_train.models.pattern import ATTENTION, MOE, SSM

GRANITE = "GraniteMoeHybridForCausalLM"


def _swap(t: torch.Tensor, dim: int) -> torch.Tensor:
    """[a, b] halves -> [b, a] (its own inverse)."""
    a, b = t.chunk(2, dim)
    return torch.cat([b, a], dim)


def _from(raw: Mapping[str, Any]) -> MambaLMConfig:
    c = _silu_config("granitemoehybrid", raw, "Granite 4.0-H")
    d, eps, experts = c.hidden_size, _eps(c), c.num_local_experts or 0
    mixers = [SSM if t in ("mamba", "linear_attention") else ATTENTION for t in c.layer_types]
    pattern = "".join(m + (MOE if experts else "-") for m in mixers)
    # its attention (and RoPE) read getattr(config, "head_dim"), which a config.json may set
    head_dim = getattr(c, "head_dim", None) or d // c.num_attention_heads
    rope = _rope(c, head_dim, partial=False) if c.position_embedding_type == "rope" else None
    ssm = _mamba2_from(d, c.mamba_n_heads, c.mamba_d_head, d_state=c.mamba_d_state,
                       d_conv=c.mamba_d_conv, ngroups=c.mamba_n_groups,
                       chunk_size=c.mamba_chunk_size, dt_limit=tuple(c.time_step_limit),
                       conv_bias=c.mamba_conv_bias, bias=c.mamba_proj_bias, norm_eps=eps)
    attn = _attn_in(c, head_dim, c.attention_bias, rope) if ATTENTION in mixers else {}
    if attn:
        attn["softmax_scale"] = float(c.attention_multiplier)
    res = float(c.residual_multiplier)
    mult = dict(embedding=float(c.embedding_multiplier), lm_head=1.0 / float(c.logits_scaling),
                attn_out=res, ssm_out=res, mlp_down=res)
    moe = dict(n_experts=experts, top_k=c.num_experts_per_tok, d_expert=c.intermediate_size,
               d_shared=c.shared_intermediate_size, act="swiglu", router="softmax",
               norm_topk_prob=True, aux_loss_coef=float(c.router_aux_loss_coef)) if experts else {}
    return _build(raw, d_model=d, n_layer=len(mixers), layer_pattern=pattern,
                  d_intermediate=0 if experts else c.shared_intermediate_size, ssm_cfg=ssm,
                  attn_cfg=attn, mlp_cfg=dict(act="swiglu", multiple_of=1), moe_cfg=moe,
                  multipliers=mult, residual_in_fp32=False, tie_embeddings=c.tie_word_embeddings,
                  norm_epsilon=eps, initializer_cfg=dict(initializer_range=c.initializer_range),
                  padding_idx=c.pad_token_id)  # its nn.Embedding's padding_idx


def _to(cfg: MambaLMConfig) -> dict[str, Any]:
    _check_common(cfg, GRANITE, {"ME", "*E", "M-", "*-"}, "swiglu")
    if cfg.n_moe_layers and cfg.n_moe_layers != cfg.n_layer:
        raise _refuse(GRANITE, f"model.layer_pattern={cfg.layer_pattern}",
                      "its layers are all mixture-of-experts or all dense")
    kw = _check_mamba2(cfg, GRANITE, norm_eps=cfg.norm_epsilon, rmsnorm=True)
    res = cfg.multiplier("mlp_down")
    for name in ("attn_in", "ssm_in", "key", "mlp_gate"):
        if cfg.multiplier(name) != 1:
            raise _refuse(GRANITE, f"model.multipliers.{name}", "it has no such multiplier")
    if any(v != 1 for v in cfg.multiplier("ssm_zxbcdt")):
        raise _refuse(GRANITE, "model.multipliers.ssm_zxbcdt", "it has no such multiplier")
    for name in ("attn_out", "ssm_out"):
        if cfg.multiplier(name) != res:
            raise _refuse(GRANITE, f"model.multipliers.{name}={cfg.multiplier(name)}",
                          f"one residual_multiplier scales every sublayer (mlp_down={res})")
    out = dict(model_type="granitemoehybrid", num_hidden_layers=cfg.n_layer,
               rms_norm_eps=cfg.norm_epsilon, hidden_act="silu",
               layer_types=["mamba" if b.mixer == SSM else "attention" for b in cfg.blocks],
               embedding_multiplier=float(cfg.multiplier("embedding")),
               logits_scaling=1.0 / float(cfg.multiplier("lm_head")), residual_multiplier=res,
               **_common_out(cfg), **_attn_out(cfg))
    if cfg.n_moe_layers:
        m = cfg.moe_kwargs()
        if m["router"] != "softmax" or not m["norm_topk_prob"] or m["act"] != "swiglu":
            raise _refuse(GRANITE, "model.moe_cfg (router, norm_topk_prob, act)",
                          "its experts are SwiGLU under a softmax over the top-k logits")
        if m["routed_scaling_factor"] != 1 or not m["d_shared"]:
            raise _refuse(GRANITE, "model.moe_cfg (routed_scaling_factor, d_shared)",
                          "it has no routed scaling and always a shared MLP")
        out.update(num_local_experts=m["n_experts"], num_experts_per_tok=m["top_k"],
                   intermediate_size=m["d_expert"], shared_intermediate_size=m["d_shared"],
                   router_aux_loss_coef=float(m["aux_loss_coef"]))
    else:
        out.update(num_local_experts=0, shared_intermediate_size=cfg.d_intermediate)
    out.update(_mamba2_out(cfg, kw, GRANITE))
    if cfg.n_attention_layers:
        a = cfg.attn_kwargs()
        out["attention_multiplier"] = float(a["softmax_scale"] or _head_dim(cfg) ** -0.5)
        if a["rotary_emb_dim"] not in (0, _head_dim(cfg)):
            raise _refuse(GRANITE, f"model.attn_cfg.rotary_emb_dim={a['rotary_emb_dim']}",
                          "its RoPE covers the whole head or nothing")
        out["position_embedding_type"] = "rope" if a["rotary_emb_dim"] else "nope"
        out["rope_parameters"] = dict(rope_type="default", rope_theta=float(a["rotary_emb_base"]))
    return out


def _layout(cfg: MambaLMConfig) -> list[tuple[str, str, str]]:
    out = _decoder_top("norm")
    for b, spec in enumerate(cfg.blocks):
        ours, theirs, norms = _decoder_block_norms(b, "post_attention_layernorm")
        out += norms + [("ssm", f"{ours}.mixer", f"{theirs}.mamba") if spec.mixer == SSM
                        else ("attn", f"{ours}.mixer", f"{theirs}.self_attn"),
                        ("moe_granite", f"{ours}.mlp", theirs)]
    return out


# ours, transformers' module name (written), its checkpoint name (also read), [gate, up] dim
_EXPERT_NAMES = (("router.weight", "block_sparse_moe.router.weight",
                  "block_sparse_moe.router.layer.weight", None),
                 ("experts.fc1.weight", "block_sparse_moe.experts.gate_up_proj",
                  "block_sparse_moe.input_linear.weight", 1),
                 ("experts.fc2.weight", "block_sparse_moe.experts.down_proj",
                  "block_sparse_moe.output_linear.weight", None))


def convert(ours: str, theirs: str, state, out, to_hf: bool, cfg: MambaLMConfig) -> None:
    """One layer's experts and shared MLP (or its dense MLP) ours <-> Granite's names. Export
    writes the names of transformers' modules, which ``from_pretrained`` loads as is; reading
    takes those or the checkpoint names ``save_pretrained`` writes (and IBM's files hold)."""
    moe = bool(cfg.n_moe_layers)
    pairs = [("shared.fc1.weight" if moe else "fc1.weight", "shared_mlp.input_linear.weight",
              "shared_mlp.input_linear.weight", 0),
             ("shared.fc2.weight" if moe else "fc2.weight", "shared_mlp.output_linear.weight",
              "shared_mlp.output_linear.weight", None)]
    for a, b, disk, swap in pairs + list(_EXPERT_NAMES if moe else ()):
        if to_hf:
            src, dst = f"{ours}.{a}", f"{theirs}.{b}"
        else:
            dst = f"{ours}.{a}"
            src = f"{theirs}.{b}" if f"{theirs}.{b}" in state else f"{theirs}.{disk}"
        if src in state:
            out[dst] = state[src] if swap is None else _swap(state[src], swap)


SUBLAYER_CONVERTERS["moe_granite"] = convert
FAMILIES = (as_hf_family(Family("granitemoehybrid", GRANITE, "GraniteMoeHybridConfig", _from,
                                _to, _layout)),)
