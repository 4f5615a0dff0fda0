"""The per-mixer and attention checks of ``MambaLMConfig.validate``: each returns the first
problem as one line naming the field (``None``: fine); ``config.py`` raises it as a
``ConfigError``."""

from __future__ import annotations

from typing import Any

from mamba_train.models.mixer_tables import A_ACTIVATIONS, A_INITS


def _size_problem(kw: dict[str, Any], where: str, ints: tuple[str, ...]) -> str | None:
    """The first of ``ints`` that is not a positive integer, and ``expand`` that is not > 0:
    caught here, they would fail as a division by zero or a zero-width layer inside the build."""
    for key in ints:
        v = kw[key]
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            return f"{where}.{key} must be a positive integer, got {v!r}"
    v = kw.get("expand", 1)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
        return f"{where}.expand must be > 0, got {v!r}"
    return None


def mamba1_problem(kw: dict[str, Any], d_model: int) -> str | None:
    problem = _size_problem(kw, "Mamba1 ssm_cfg", ("d_state", "d_conv", "dt_rank"))
    if problem:
        return problem
    if int(kw["expand"] * d_model) < 1:
        return f"Mamba1 needs d_model*expand >= 1, got {kw['expand'] * d_model:g}"
    if not isinstance(kw["dt_bc_norm"], bool):
        return f"Mamba1 ssm_cfg.dt_bc_norm must be true or false, got {kw['dt_bc_norm']!r}"
    if not kw["norm_eps"] > 0:
        return f"Mamba1 ssm_cfg.norm_eps must be > 0, got {kw['norm_eps']}"
    return None


def mamba2_problem(kw: dict[str, Any], d_model: int) -> str | None:
    problem = _size_problem(kw, "Mamba2 ssm_cfg", ("d_state", "d_conv", "headdim", "ngroups",
                                           "chunk_size"))
    if problem:
        return problem
    d_inner = kw.get("d_inner") or kw["expand"] * d_model
    d_ssm = d_inner if kw["d_ssm"] is None else kw["d_ssm"]
    if not isinstance(d_inner, int) or d_inner <= 0:
        return (f"Mamba2 needs an integer inner width, got d_model*expand = "
                f"{d_inner!r}; set ssm_cfg.d_inner (or an integer expand)")
    if not isinstance(d_ssm, int) or not 0 < d_ssm <= d_inner:
        return (f"Mamba2 ssm_cfg.d_ssm (the SSM part of the inner width) must be an integer in "
                f"(0, {d_inner}], got {d_ssm!r}")
    if d_ssm % kw["headdim"] != 0:
        return (
            f"Mamba2 needs its SSM width (d_model*expand, or ssm_cfg.d_inner / d_ssm: {d_ssm}) to be "
            f"divisible by ssm_cfg.headdim={kw['headdim']}; change d_model, expand or headdim"
        )
    nheads = d_ssm // kw["headdim"]
    if d_ssm % kw["ngroups"] != 0 or nheads % kw["ngroups"] != 0:
        return (
            f"Mamba2 needs the {nheads} heads to split into ssm_cfg.ngroups={kw['ngroups']} "
            "equal groups"
        )
    cs = kw["chunk_size"]
    if cs <= 0 or cs & (cs - 1):
        return (
            f"Mamba2 ssm_cfg.chunk_size must be a power of two (the Triton SSD kernels "
            f"assume it), got {cs}"
        )
    lo, hi = kw["dt_limit"]
    if not 0 <= lo <= hi:
        return f"Mamba2 ssm_cfg.dt_limit must satisfy 0 <= lo <= hi, got {(lo, hi)}"
    lo, hi = kw["A_init_range"]
    if not (0 < lo <= hi):
        return (f"Mamba2 ssm_cfg.A_init_range must satisfy 0 < lo <= hi, got {(lo, hi)}")
    if kw.get("A_init", "uniform") not in A_INITS:
        return (f"Mamba2 ssm_cfg.A_init must be one of {A_INITS}, got {kw['A_init']!r}")
    if kw.get("norm_eps", 1e-5) <= 0:
        return (f"Mamba2 ssm_cfg.norm_eps must be > 0, got {kw['norm_eps']}")
    return None


def mamba3_problem(kw: dict[str, Any], d_model: int) -> str | None:
    problem = _size_problem(kw, "Mamba3 ssm_cfg", ("d_state", "headdim", "ngroups", "chunk_size")
                            + (("mimo_rank",) if kw["is_mimo"] else ()))
    if problem:
        return problem
    d_inner = int(kw["expand"] * d_model)
    if d_inner % kw["headdim"]:
        return (
            f"Mamba3 needs d_model*expand (= {d_inner}) to be divisible by "
            f"ssm_cfg.headdim={kw['headdim']}; change d_model, expand or headdim")
    if (d_inner // kw["headdim"]) % kw["ngroups"]:
        return (f"Mamba3 needs the {d_inner // kw['headdim']} heads to split into "
                f"ssm_cfg.ngroups={kw['ngroups']} equal groups")
    if kw["rope_fraction"] not in (0.5, 1.0):
        return (f"Mamba3 ssm_cfg.rope_fraction must be 0.5 or 1.0, got "
                f"{kw['rope_fraction']}")
    angles = int(kw["d_state"] * kw["rope_fraction"]) // 2
    if angles < 2 or angles % 2:
        return (
            f"Mamba3 ssm_cfg.d_state*rope_fraction (= {kw['d_state'] * kw['rope_fraction']:g}) "
            "must be a multiple of 4: the SISO kernel needs an even number of RoPE angles")
    if kw.get("A_activation", "softplus") not in A_ACTIVATIONS:
        return (f"Mamba3 ssm_cfg.A_activation must be softplus (mamba_ssm 2.3.2) "
                f"or heavy_tail (newer mamba_ssm), got {kw['A_activation']!r}")
    cs = kw["chunk_size"]
    if cs <= 0 or cs & (cs - 1):
        return (f"Mamba3 ssm_cfg.chunk_size must be a power of two, got {cs}")
    if kw["A_floor"] <= 0:
        return (f"Mamba3 ssm_cfg.A_floor must be > 0, got {kw['A_floor']}")
    return None


def attention_problem(kw: dict[str, Any], d_model: int, num_heads_set: bool) -> str | None:
    if not num_heads_set:
        return ("model.attn_cfg.num_heads is required when the model has attention "
                          "layers (attn_layer_idx, or * / P in layer_pattern)")
    sizes = ("num_heads",) + tuple(k for k in ("num_heads_kv", "head_dim") if kw[k] is not None)
    problem = _size_problem(kw, "model.attn_cfg", sizes)
    if problem:
        return problem
    heads, kv = kw["num_heads"], kw["num_heads_kv"] or kw["num_heads"]
    if heads % kv:
        return (f"attn_cfg.num_heads={heads} must be divisible by num_heads_kv={kv}")
    if kw["head_dim"] is None and d_model % heads:
        return (
            f"d_model={d_model} must be divisible by attn_cfg.num_heads={heads} "
            "(or set attn_cfg.head_dim)"
        )
    head_dim = kw["head_dim"] or d_model // heads
    if not kw["causal"]:
        return (
            "model.attn_cfg.causal must be true: a language model's attention may not see "
            "later tokens (mamba_ssm's MHA defaults to causal=False, so set it explicitly)"
        )
    if kw["rotary_emb_dim"] % 2 or kw["rotary_emb_dim"] > head_dim:
        return (
            f"attn_cfg.rotary_emb_dim={kw['rotary_emb_dim']} must be even and <= head_dim={head_dim}"
        )
    return None
