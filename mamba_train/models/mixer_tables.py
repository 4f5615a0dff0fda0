"""The mixers' keyword tables: which ``ssm_cfg`` / ``attn_cfg`` keys each mixer accepts and
their defaults, as in ``mamba_ssm`` 2.x's signatures (plus the few knobs of ours, marked below).

``MambaLMConfig.validate`` (``models/config.py``) checks a config against them; the format
converters read the defaults to write only what differs.
"""

from __future__ import annotations

from typing import Any

MIXER_LAYERS = ("Mamba1", "Mamba2", "Mamba3")

# Keyword arguments each mixer accepts (mamba_ssm 2.x signatures). Anything else in ``ssm_cfg``
# is a typo or a knob of another version, and silently ignoring it would train the wrong model.
MAMBA1_KWARGS = {
    "d_state", "d_conv", "expand", "dt_rank", "dt_min", "dt_max", "dt_init", "dt_scale",
    "dt_init_floor", "conv_bias", "bias", "use_fast_path",
} | {"dt_bc_norm", "norm_eps"}
MAMBA2_KWARGS = {
    "d_state", "d_conv", "conv_init", "expand", "headdim", "d_ssm", "ngroups", "A_init_range",
    "D_has_hdim", "rmsnorm", "norm_before_gate", "dt_min", "dt_max", "dt_init_floor", "dt_limit",
    "bias", "conv_bias", "chunk_size", "use_mem_eff_path",
} | {"d_inner", "norm_eps", "A_init", "dt_bias_init"}
# Mamba-2 knobs of ours that mamba_ssm's Mamba2 lacks, for the transformers hybrids (Nemotron-H,
# Bamba, Falcon-H1): an inner width that is not expand*d_model, the gated norm's eps (mamba_ssm
# fixes 1e-5), and their SSM init (A_h = h for head h = 1..nheads; Bamba and Falcon-H1 start
# every dt_bias at 1). Absent from a config unless set, so mamba_ssm still reads pure-Mamba files.
# Mamba-1 knobs of ours for Jamba (transformers' JambaMambaMixer): RMS norms on dt (dt_rank wide),
# B and C (d_state wide) between x_proj and dt_proj / the scan, with their eps.
MAMBA1_EXTENSION_DEFAULTS: dict[str, Any] = dict(dt_bc_norm=False, norm_eps=1e-5)
MAMBA2_EXTENSION_DEFAULTS: dict[str, Any] = dict(
    d_inner=None, norm_eps=1e-5, A_init="uniform", dt_bias_init=None)
A_INITS = ("uniform", "arange")
# mamba_ssm 2.3.2's Mamba3 signature, plus our A_activation (see models/reference/mamba3.py)
MAMBA3_KWARGS = {
    "d_state", "expand", "headdim", "ngroups", "rope_fraction", "dt_min", "dt_max",
    "dt_init_floor", "A_floor", "is_outproj_norm", "is_mimo", "mimo_rank", "chunk_size",
    "dropout", "A_activation",
}
# Kernel choices are not model keys (the same maths either way, and mamba_ssm's Mamba2 rejects
# unknown keys): they live in the run's ``kernels`` block (models/kernels.py). Such a key in
# ssm_cfg is refused with the line naming its place.
KERNEL_KEYS = {"ssd_kernel": "kernels.ssd"}
# Mamba-3's A activation: softplus (mamba_ssm 2.3.2) or heavy_tail (newer mamba_ssm)
A_ACTIVATIONS = ("softplus", "heavy_tail")

MAMBA1_DEFAULTS: dict[str, Any] = dict(
    d_state=16, d_conv=4, expand=2, dt_rank="auto", dt_min=0.001, dt_max=0.1, dt_init="random",
    dt_scale=1.0, dt_init_floor=1e-4, conv_bias=True, bias=False,
)
MAMBA2_DEFAULTS: dict[str, Any] = dict(
    d_state=128, d_conv=4, conv_init=None, expand=2, headdim=64, d_ssm=None, ngroups=1,
    A_init_range=(1, 16), D_has_hdim=False, rmsnorm=True, norm_before_gate=False, dt_min=0.001,
    dt_max=0.1, dt_init_floor=1e-4, dt_limit=(0.0, float("inf")), bias=False, conv_bias=True,
    chunk_size=256,
)
MAMBA3_DEFAULTS: dict[str, Any] = dict(
    d_state=128, expand=2, headdim=64, ngroups=1, rope_fraction=0.5, dt_min=0.001, dt_max=0.1,
    dt_init_floor=1e-4, A_floor=1e-4, is_outproj_norm=False, is_mimo=False, mimo_rank=4,
    chunk_size=64,
)
# layer name -> (accepted keyword arguments, defaults)
MIXER_TABLES = {
    "Mamba1": (MAMBA1_KWARGS, MAMBA1_DEFAULTS),
    "Mamba2": (MAMBA2_KWARGS, MAMBA2_DEFAULTS),
    "Mamba3": (MAMBA3_KWARGS, MAMBA3_DEFAULTS),
}
ATTN_DEFAULTS: dict[str, Any] = dict(
    num_heads_kv=None, head_dim=None, mlp_dim=0, qkv_proj_bias=True, out_proj_bias=True,
    softmax_scale=None, causal=False, d_conv=0, rotary_emb_dim=0, rotary_emb_base=10000.0,
    rotary_emb_interleaved=False,
)
