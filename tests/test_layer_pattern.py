"""Layer patterns (models/pattern.py): parsing, validation, the modules and names they build,
FLOPs and SSM health over them."""

from __future__ import annotations

import pytest
import torch

from mamba_train.models.build import build_model
from mamba_train.models.config import ConfigError, MambaLMConfig
from mamba_train.models.flops import attention_flops_per_token, flops_breakdown, ssm_flops_per_token
from mamba_train.models.pattern import BlockSpec, parse_pattern

SSM = dict(layer="Mamba2", d_state=16, headdim=16, chunk_size=16)
ATTN = dict(num_heads=4, causal=True, qkv_proj_bias=False, out_proj_bias=False)


def cfg(pattern: str, n_layer: int, d_intermediate: int = 64, **kw) -> MambaLMConfig:
    return MambaLMConfig(d_model=32, n_layer=n_layer, vocab_size=64, layer_pattern=pattern,
                         d_intermediate=d_intermediate, ssm_cfg=SSM, attn_cfg=ATTN, **kw)


def test_pattern_groups_a_mixer_with_the_mlp_after_it():
    assert parse_pattern("MM-*--P-") == [BlockSpec("M", False), BlockSpec("M", True),
                                         BlockSpec("*", True), BlockSpec(None, True),
                                         BlockSpec("P", True)]


@pytest.mark.parametrize("kwargs,field", [
    (dict(pattern="M-X", n_layer=2), "symbols"),
    (dict(pattern="M-M-", n_layer=3), "n_layer=2"),
    (dict(pattern="MM", n_layer=2), "d_intermediate"),
    (dict(pattern="M-", n_layer=1, attn_layer_idx=[0]), "attn_layer_idx"),
    (dict(pattern="M-", n_layer=1, mlp_cfg=dict(act="gelu")), "mlp_cfg.act"),
    (dict(pattern="M-", n_layer=1, multipliers=dict(embeding=2.0)), "multipliers"),
    (dict(pattern="M-", n_layer=1, multipliers=dict(ssm_zxbcdt=[1.0, 2.0])), "ssm_zxbcdt"),
    (dict(pattern="M-", n_layer=1, mlp_cfg=dict(act="relu2"), multipliers=dict(mlp_gate=2.0)),
     "mlp_gate"),
])
def test_bad_layouts_name_the_field(kwargs, field):
    kwargs = dict(kwargs)
    pattern, n_layer = kwargs.pop("pattern"), kwargs.pop("n_layer")
    if pattern == "MM":
        kwargs["d_intermediate"] = 64
    with pytest.raises(ConfigError, match=field):
        cfg(pattern, n_layer, **kwargs)


def test_modules_and_names_of_each_block_kind():
    model = build_model(cfg("MM-*-P-", 4, multipliers=dict(embedding=2.0)), backend="reference")
    names = set(model.state_dict())
    assert "backbone.layers.0.mixer.A_log" in names and "backbone.layers.0.norm2.weight" not in names
    assert {"backbone.layers.1.norm2.weight", "backbone.layers.1.mlp.fc1.weight"} <= names
    assert "backbone.layers.2.mixer.in_proj.weight" in names  # attention, mamba_ssm's MHA names
    assert {"backbone.layers.3.mixer.ssm.dt_bias", "backbone.layers.3.mixer.attn.out_proj.weight"} <= names
    assert model.backbone.layers[3].ssm_mixer is model.backbone.layers[3].mixer.ssm
    loss = model(torch.randint(0, 64, (2, 24)), labels=torch.randint(0, 64, (2, 24))).loss
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_mlp_only_block():
    model = build_model(cfg("M--", 2), backend="reference")
    block = model.backbone.layers[1]
    assert block.mixer is None and block.ssm_mixer is None
    assert {n for n, _ in block.named_parameters()} == {"norm.weight", "mlp.fc1.weight", "mlp.fc2.weight"}


def test_derived_layout_is_unchanged():
    """No pattern: mamba_ssm's layout, the same module names as before patterns existed."""
    old = MambaLMConfig(d_model=32, n_layer=3, vocab_size=64, d_intermediate=64, ssm_cfg=SSM,
                        attn_layer_idx=[1], attn_cfg=ATTN)
    new = cfg("M-*-M-", 3)
    a = build_model(old, backend="reference").state_dict()
    b = build_model(new, backend="reference").state_dict()
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    assert "layer_pattern" not in old.to_dict() and new.to_dict()["layer_pattern"] == "M-*-M-"


def test_flops_count_parallel_blocks_in_both_and_mlp_blocks_in_neither():
    c = cfg("P-M--*", 4)
    b = flops_breakdown(c, seq_len=64)
    assert b.ssm == 2 * ssm_flops_per_token(c, 64)
    assert b.attention == 2 * attention_flops_per_token(c, 64)


def test_ssm_zxbcdt_with_a_gated_mlp_part_is_refused_in_the_config():
    """The multipliers scale [z, x, B, C, dt] only; with d_ssm < d_inner the in_proj has an MLP
    part in front, which the build refused with a bare ValueError."""
    with pytest.raises(ConfigError, match="d_ssm=32"):
        MambaLMConfig(d_model=32, n_layer=1, vocab_size=64, layer_pattern="M",
                      ssm_cfg=dict(SSM, d_ssm=32), multipliers=dict(ssm_zxbcdt=[2.0, 1, 1, 1, 1]))


def test_mamba2_flops_use_the_explicit_inner_width():
    """ssm_cfg.d_inner (the transformers hybrids' heads * head_dim) sets the scan's width, not
    expand * d_model: the count follows the built mixer."""
    c = MambaLMConfig(d_model=16, n_layer=1, vocab_size=64, layer_pattern="M",
                      ssm_cfg=dict(layer="Mamba2", d_inner=36, headdim=4, ngroups=3, d_state=16,
                                   chunk_size=16))
    m = build_model(c, backend="reference").backbone.layers[0].mixer
    assert m.d_ssm == 36
    q, n = 16, m.d_state
    want = 2 * q * (n * m.ngroups + m.d_ssm) + 4 * n * m.d_ssm + m.d_ssm
    assert ssm_flops_per_token(c, 64) == want


def test_ssm_health_reads_the_ssm_inside_a_parallel_block():
    from mamba_train.training.run.callbacks.ssm_health import SSMHealthMonitor

    model = build_model(cfg("P--", 2), backend="reference")
    stats = SSMHealthMonitor(every_n_steps=1).health_stats(model)
    dt = torch.nn.functional.softplus(model.backbone.layers[0].mixer.ssm.dt_bias.detach())
    assert stats["ssm/layer00/dt_max"] == pytest.approx(float(dt.max()))
    assert "ssm/layer01/dt_max" not in stats and "ssm/layer01/param_norm" in stats


@pytest.mark.parametrize("ssm", [dict(layer="Mamba1", d_state=8),
                                 dict(layer="Mamba3", d_state=16, headdim=16, chunk_size=16)],
                         ids=["Mamba1", "Mamba3"])
def test_every_mixer_family_sits_at_M(ssm):
    c = MambaLMConfig(d_model=32, n_layer=3, vocab_size=64, layer_pattern="M-*M-",
                      d_intermediate=64, ssm_cfg=ssm, attn_cfg=ATTN)
    model = build_model(c, backend="reference")
    from mamba_train.models.init import check_ssm_init
    assert check_ssm_init(model) == 2
    out = model(torch.randint(0, 64, (1, 20))).logits
    assert out.shape == (1, 20, 64) and torch.isfinite(out).all()


def test_run_summary_names_the_pattern():
    from mamba_train.training.run.callbacks.run_start import _mixers

    assert _mixers(cfg("MM-*-P-", 4)) == "pattern MM-*-P-: Mamba2 x 3, attention x 2, MLP x 3"
