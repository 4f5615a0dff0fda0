"""AI21 Jamba (transformers' ``JambaForCausalLM``) <-> mamba_train.

The maths read in transformers 5.x ``models/jamba/{configuration,modeling}_jamba.py``: every
layer is ``input_layernorm`` -> a Mamba-1 mixer (``mamba``) or attention (``self_attn``: q/k/v/o
without biases, no positional encoding, scores scaled by head_dim**-0.5) -> residual ->
``pre_ff_layernorm`` -> a SwiGLU MLP or experts (``feed_forward``) -> residual. Attention sits
where ``i % attn_layer_period == attn_layer_offset``, experts where ``i % expert_layer_period ==
expert_layer_offset``. The Mamba-1 mixer is mamba_ssm's with RMS norms (eps ``rms_norm_eps``)
on the dt_rank-wide dt and the d_state-wide B and C right after ``x_proj`` (our
``ssm_cfg.dt_bc_norm``; ``dt_layernorm``/``b_layernorm``/``c_layernorm`` there, ``dt_norm``/
``B_norm``/``C_norm`` here). The router takes the top-k of the full softmax without
renormalising (``norm_topk_prob=false``); no shared expert; ``router_aux_loss_coef`` is the
Switch load-balancing loss (transformers adds it with ``output_router_logits``).

Here: pattern ``M-``/``ME``/``*-``/``*E`` blocks whose attention and expert positions are each
periodic; ``intermediate_size`` is both the MLP and each expert's width. Checkpoints hold the
experts per expert (``experts.{j}.{gate,up,down}_proj.weight``, AI21's files and what
``save_pretrained`` writes) or stacked (``experts.gate_up_proj`` (E, 2I, D) as [gate, up], ours
[up, gate]; ``experts.down_proj``), which is what export writes: the round trip only swaps halves.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from mamba_train.formats.hf_hybrid_families import (_decoder_block_norms, _decoder_top,
                                                    _silu_config)
from mamba_train.formats.hf_family import ExportError
from mamba_train.formats.hf_hybrids import (SUBLAYER_CONVERTERS, Family, _build, _check_common,
                                            _common_out, _head_dim, _refuse, as_hf_family)
from mamba_train.formats.hf_moe_granite import _swap
from mamba_train.models.config import MambaLMConfig
from mamba_train.models.pattern import ATTENTION, MLP, MOE, SSM

JAMBA = "JambaForCausalLM"
# ours under <block>.mixer -> transformers' under <layer>.mamba (the rest is named alike)
_NORM_NAMES = (("dt_norm.", "dt_layernorm."), ("B_norm.", "b_layernorm."),
               ("C_norm.", "c_layernorm."))


def period_of(indices: set[int], n_layer: int) -> tuple[int, int] | None:
    """The smallest (period, offset), offset < period, whose layers ``i % period == offset``
    among ``n_layer`` are exactly ``indices`` (none: (n_layer + 1, n_layer)); None if no such."""
    for period in range(1, n_layer + 2):
        for offset in range(period):
            if {i for i in range(n_layer) if i % period == offset} == indices:
                return period, offset
    return None


def _from(raw: Mapping[str, Any]) -> MambaLMConfig:
    c = _silu_config("jamba", raw, "Jamba")
    d, eps = c.hidden_size, float(c.rms_norm_eps)
    mixers = [ATTENTION if t == "attention" else SSM for t in c.layers_block_type]
    ffns = [MOE if n > 1 else MLP for n in c.layers_num_experts]
    pattern = "".join(m + f for m, f in zip(mixers, ffns))
    ssm = dict(layer="Mamba1", d_state=c.mamba_d_state, d_conv=c.mamba_d_conv,
               expand=c.mamba_expand, dt_rank=int(c.mamba_dt_rank), conv_bias=c.mamba_conv_bias,
               bias=c.mamba_proj_bias, dt_bc_norm=True, norm_eps=eps)
    attn = {}
    if ATTENTION in mixers:
        attn = dict(num_heads=c.num_attention_heads, num_heads_kv=c.num_key_value_heads,
                    head_dim=getattr(c, "head_dim", None) or d // c.num_attention_heads,
                    qkv_proj_bias=False, out_proj_bias=False, causal=True)
    moe = dict(n_experts=c.num_experts, top_k=c.num_experts_per_tok,
               d_expert=c.intermediate_size, act="swiglu", router="softmax",
               norm_topk_prob=False, aux_loss_coef=float(c.router_aux_loss_coef)
               ) if MOE in ffns else {}
    return _build(raw, d_model=d, n_layer=len(mixers), layer_pattern=pattern,
                  d_intermediate=c.intermediate_size if MLP in ffns else 0, ssm_cfg=ssm,
                  attn_cfg=attn, mlp_cfg=dict(act="swiglu", bias=False, multiple_of=1),
                  moe_cfg=moe, residual_in_fp32=False, tie_embeddings=c.tie_word_embeddings,
                  norm_epsilon=eps, initializer_cfg=dict(initializer_range=c.initializer_range),
                  padding_idx=c.pad_token_id)  # its nn.Embedding's padding_idx


def _placement(cfg: MambaLMConfig, what: str, indices: set[int]) -> tuple[int, int]:
    found = period_of(indices, cfg.n_layer)
    if found is None:
        raise _refuse(JAMBA, f"model.layer_pattern={cfg.layer_pattern}",
                      f"its {what} layers are every {what}_layer_period-th from an offset, not "
                      f"at {sorted(indices)}")
    return found


def _mamba_fields(cfg: MambaLMConfig) -> dict[str, Any]:
    """The ``mamba_*`` fields. A model without Mamba layers writes its ``ssm_cfg``'s where they
    fit (those of the Jamba it was read from), else none: no layer is built from them."""
    try:
        if cfg.layer != "Mamba1":
            raise _refuse(JAMBA, f"model.ssm_cfg.layer={cfg.layer}", "its SSM mixer is Mamba-1")
        kw = cfg.mixer_kwargs()
        if not kw["dt_bc_norm"]:
            raise _refuse(JAMBA, "model.ssm_cfg.dt_bc_norm=false", "its Mamba-1 mixer normalises "
                          "dt, B and C")
        if float(kw["norm_eps"]) != float(cfg.norm_epsilon):
            raise _refuse(JAMBA, f"model.ssm_cfg.norm_eps={kw['norm_eps']}",
                          f"its dt/B/C norms use the block norms' eps {cfg.norm_epsilon}")
        if not isinstance(kw["expand"], int) or isinstance(kw["expand"], bool):
            raise _refuse(JAMBA, f"model.ssm_cfg.expand={kw['expand']!r}",
                          "mamba_expand is an integer")
    except ExportError:
        if cfg.n_ssm_layers:
            raise
        return {}
    return dict(mamba_d_state=kw["d_state"], mamba_d_conv=kw["d_conv"],
                mamba_expand=kw["expand"], mamba_dt_rank=int(kw["dt_rank"]),
                mamba_conv_bias=bool(kw["conv_bias"]), mamba_proj_bias=bool(kw["bias"]))


def _to(cfg: MambaLMConfig) -> dict[str, Any]:
    _check_common(cfg, JAMBA, {"M-", "ME", "*-", "*E"}, "swiglu")
    blocks = cfg.blocks
    out = dict(model_type="jamba", num_hidden_layers=cfg.n_layer,
               rms_norm_eps=float(cfg.norm_epsilon), hidden_act="silu", **_common_out(cfg),
               **_mamba_fields(cfg))
    attn = {i for i, b in enumerate(blocks) if b.mixer == ATTENTION}
    out["attn_layer_period"], out["attn_layer_offset"] = _placement(cfg, "attn", attn)
    if attn:
        a = cfg.attn_kwargs()
        if a["rotary_emb_dim"]:
            raise _refuse(JAMBA, f"model.attn_cfg.rotary_emb_dim={a['rotary_emb_dim']}",
                          "its attention has no positional encoding")
        if a["qkv_proj_bias"] or a["out_proj_bias"]:
            raise _refuse(JAMBA, "model.attn_cfg.qkv_proj_bias/out_proj_bias",
                          "its attention projections have no bias")
        out.update(num_attention_heads=a["num_heads"],
                   num_key_value_heads=a["num_heads_kv"] or a["num_heads"],
                   head_dim=_head_dim(cfg))
    if cfg.d_intermediate and cfg.mlp_kwargs()["bias"]:
        raise _refuse(JAMBA, "model.mlp_cfg.bias=true", "its MLPs have no bias")
    experts = {i for i, b in enumerate(blocks) if b.moe}
    out["expert_layer_period"], out["expert_layer_offset"] = _placement(cfg, "expert", experts)
    out.update(num_experts=1, num_experts_per_tok=1, intermediate_size=cfg.d_intermediate)
    if experts:
        out.update(_expert_fields(cfg))
    return out


def _expert_fields(cfg: MambaLMConfig) -> dict[str, Any]:
    m = cfg.moe_kwargs()
    if m["router"] != "softmax" or m["norm_topk_prob"] or m["act"] != "swiglu":
        raise _refuse(JAMBA, "model.moe_cfg (router, norm_topk_prob, act)", "its experts are "
                      "SwiGLU under the top-k of a full softmax, not renormalised")
    if m["d_shared"] or m["routed_scaling_factor"] != 1:
        raise _refuse(JAMBA, "model.moe_cfg (d_shared, routed_scaling_factor)",
                      "it has no shared expert and no routed scaling")
    if m["n_experts"] < 2:
        raise _refuse(JAMBA, "model.moe_cfg.n_experts=1", "a one-expert layer is its dense MLP")
    if cfg.d_intermediate and m["d_expert"] != cfg.d_intermediate:
        raise _refuse(JAMBA, f"model.moe_cfg.d_expert={m['d_expert']}",
                      f"one intermediate_size is the MLP's and every expert's width "
                      f"(d_intermediate={cfg.d_intermediate})")
    return dict(num_experts=m["n_experts"], num_experts_per_tok=m["top_k"],
                intermediate_size=m["d_expert"], router_aux_loss_coef=float(m["aux_loss_coef"]))


def _layout(cfg: MambaLMConfig) -> list[tuple[str, str, str]]:
    out = _decoder_top("final_layernorm")
    for b, spec in enumerate(cfg.blocks):
        ours, theirs, norms = _decoder_block_norms(b, "pre_ff_layernorm")
        out += norms + [("ssm_jamba", f"{ours}.mixer", f"{theirs}.mamba") if spec.mixer == SSM
                        else ("attn", f"{ours}.mixer", f"{theirs}.self_attn"),
                        ("moe_jamba" if spec.moe else "swiglu", f"{ours}.mlp",
                         f"{theirs}.feed_forward")]
    return out


def convert_mixer(ours: str, theirs: str, state, out, to_hf: bool, cfg) -> None:
    """A Mamba-1 mixer: the same names on both sides but for the three dt/B/C norms."""
    src, dst = (ours, theirs) if to_hf else (theirs, ours)
    for name, t in state.items():
        if not name.startswith(src + "."):
            continue
        rest = name[len(src) + 1:]
        for a, b in _NORM_NAMES:
            mine, other = (a, b) if to_hf else (b, a)
            if rest.startswith(mine):
                rest = other + rest[len(mine):]
        out[f"{dst}.{rest}"] = t


def convert_experts(ours: str, theirs: str, state, out, to_hf: bool, cfg) -> None:
    """One layer's router and experts, ours <-> transformers' (stacked written, per-expert
    also read)."""
    names = (("router.weight", "router.weight"), ("experts.fc1.weight", "experts.gate_up_proj"),
             ("experts.fc2.weight", "experts.down_proj"))
    for a, b in names:
        src, dst = (f"{ours}.{a}", f"{theirs}.{b}") if to_hf else (f"{theirs}.{b}", f"{ours}.{a}")
        if src in state:
            out[dst] = _swap(state[src], 1) if a == "experts.fc1.weight" else state[src]
    if to_hf or f"{ours}.experts.fc1.weight" in out:
        return
    n = cfg.moe_kwargs()["n_experts"]
    per = {p: [state.get(f"{theirs}.experts.{j}.{p}_proj.weight") for j in range(n)]
           for p in ("gate", "up", "down")}
    if all(t is not None for ts in per.values() for t in ts):
        out[f"{ours}.experts.fc1.weight"] = torch.cat(
            [torch.stack(per["up"]), torch.stack(per["gate"])], 1)
        out[f"{ours}.experts.fc2.weight"] = torch.stack(per["down"])


SUBLAYER_CONVERTERS["ssm_jamba"] = convert_mixer
SUBLAYER_CONVERTERS["moe_jamba"] = convert_experts
FAMILIES = (as_hf_family(Family("jamba", JAMBA, "JambaConfig", _from, _to, _layout,
                                ssm_layer="Mamba1")),)
