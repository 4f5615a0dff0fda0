"""The S4/Mamba initialisation survives every way a framework re-initialises a model, and the
check catches the ways it cannot survive (each guard is shown to matter by a negative control)."""

import math

import pytest
import torch
from torch import nn

from mamba_train import MambaLMConfig, build_model, load_model
from mamba_train.models.init import (DeltaProjection, SSMInitError, check_ssm_init,
                                     init_weights)

M1 = dict(d_model=64, n_layer=2, vocab_size=256, ssm_cfg={"layer": "Mamba1"})
M2 = dict(d_model=64, n_layer=2, vocab_size=256,
          ssm_cfg={"layer": "Mamba2", "d_state": 16, "headdim": 16, "chunk_size": 16})


@pytest.fixture(params=["mamba1", "mamba2"])
def config(request):
    return MambaLMConfig(**(M1 if request.param == "mamba1" else M2))


def _materialise_module_by_module(model: nn.Module) -> None:
    """What FSDP's meta-device materialisation does: to_empty, then every submodule's
    reset_parameters in module order (parents before children)."""
    model.to_empty(device="cpu")
    for module in model.modules():
        if module is not model and callable(getattr(module, "reset_parameters", None)):
            module.reset_parameters()


def test_fresh_model_passes_and_has_mamba_distributions(config):
    torch.manual_seed(0)
    model = build_model(config, backend="reference")
    assert check_ssm_init(model) == config.n_layer
    mixer = model.backbone.layers[0].mixer
    kw = config.mixer_kwargs()
    dt_bias = mixer.dt_proj.bias if config.layer == "Mamba1" else mixer.dt_bias
    dt = torch.nn.functional.softplus(dt_bias)
    assert dt.min() >= kw["dt_init_floor"] and dt.max() <= kw["dt_max"] * 1.0001
    # log-uniform: the median of log(dt) sits near the middle of [log dt_min, log dt_max]
    mid = (math.log(kw["dt_min"]) + math.log(kw["dt_max"])) / 2
    if dt.numel() >= 64:
        assert abs(dt.log().median().item() - mid) < 0.6
    assert torch.all(mixer.D == 1)
    # out_proj rescaled by 1/sqrt(n_layer) (prenorm residual): bound of kaiming_uniform(a=√5)
    fan_in = mixer.out_proj.weight.shape[1]
    bound = 1 / math.sqrt(fan_in) / math.sqrt(config.n_layer)
    assert mixer.out_proj.weight.abs().max() <= bound * 1.0001
    assert mixer.out_proj.weight.abs().max() > bound * 0.9
    assert model.backbone.embedding.weight.std().item() == pytest.approx(0.02, rel=0.1)


def test_meta_device_materialisation_module_by_module(config):
    model = build_model(config, backend="reference", device="meta")
    _materialise_module_by_module(model)
    check_ssm_init(model)


def test_meta_materialisation_without_ssm_reset_is_caught(config):
    """Negative control: a plain nn.Linear Δ projection (as in mamba_ssm) loses the Δ range when
    materialised module by module, and to_empty alone leaves garbage; the check says so."""
    model = build_model(config, backend="reference", device="meta")
    if config.layer == "Mamba1":
        for block in model.backbone.layers:
            old = block.mixer.dt_proj
            block.mixer.dt_proj = nn.Linear(old.in_features, old.out_features, device="meta")
        _materialise_module_by_module(model)
    else:
        model.to_empty(device="cpu")
        with torch.no_grad():
            for block in model.backbone.layers:
                block.mixer.dt_bias.fill_(0.0)
    with pytest.raises(SSMInitError, match=r"backbone\.layers\.0\.mixer"):
        check_ssm_init(model)


def test_full_reset_parameters_after_to_empty(config):
    model = build_model(config, backend="reference", device="meta")
    model.to_empty(device="cpu")
    model.reset_parameters()
    check_ssm_init(model)
    assert model.lm_head.weight is model.backbone.embedding.weight


def _hf_style_init(module: nn.Module) -> None:
    """A generic framework init hook: every Linear re-drawn, every Linear bias zeroed."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)


def test_generic_linear_init_hooks_cannot_reach_the_ssm_parameters(config):
    model = build_model(config, backend="reference")
    ssm_before = {n: p.clone() for n, p in model.named_parameters()
                  if n.endswith(("A_log", ".D", "dt_bias", "dt_proj.bias", "dt_proj.weight"))}
    model.apply(_hf_style_init)
    for name, before in ssm_before.items():
        assert torch.equal(dict(model.named_parameters())[name], before), name
    check_ssm_init(model)


def test_dt_proj_is_not_an_nn_linear():
    model = build_model(MambaLMConfig(**M1), backend="reference")
    assert isinstance(model.backbone.layers[0].mixer.dt_proj, DeltaProjection)
    assert not isinstance(model.backbone.layers[0].mixer.dt_proj, nn.Linear)


def test_name_based_bias_zeroing_is_caught_and_init_weights_restores(config):
    model = build_model(config, backend="reference")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "bias" in name:
                p.zero_()
    with pytest.raises(SSMInitError, match=r"Δ bias"):
        check_ssm_init(model)
    init_weights(model, config.n_layer)
    check_ssm_init(model)


def test_a_log_overwrite_is_caught(config):
    model = build_model(config, backend="reference")
    with torch.no_grad():
        model.backbone.layers[1].mixer.A_log.normal_()
    with pytest.raises(SSMInitError, match=r"layers\.1\.mixer\.A_log"):
        check_ssm_init(model)


def test_init_weights_is_idempotent_in_distribution(config):
    torch.manual_seed(1)
    model = build_model(config, backend="reference")
    w0 = model.backbone.layers[0].mixer.out_proj.weight.clone()
    init_weights(model, config.n_layer)
    init_weights(model, config.n_layer)
    w2 = model.backbone.layers[0].mixer.out_proj.weight
    # the 1/sqrt(n_layer) rescale is re-derived, not compounded
    assert w2.abs().max().item() == pytest.approx(w0.abs().max().item(), rel=0.1)
    check_ssm_init(model)


@pytest.mark.parametrize("safe", [False, True])
def test_loading_a_checkpoint_is_bit_identical_and_runs_no_init(config, tmp_path, safe):
    model = build_model(config, backend="reference")
    with torch.no_grad():  # "trained" weights outside the init distribution
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    model.save_pretrained(tmp_path, safe_serialization=safe)
    loaded = load_model(tmp_path, backend="reference")
    ref, got = model.state_dict(), loaded.state_dict()
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    assert loaded.lm_head.weight is loaded.backbone.embedding.weight


def test_conv_init_survives_the_generic_resets():
    """Mamba-2's conv_init re-draws conv1d.weight; the generic conv reset must not undo it."""
    cfg = MambaLMConfig(**{**M2, "ssm_cfg": {**M2["ssm_cfg"], "conv_init": 0.01}})
    model = build_model(cfg, backend="reference")
    for block in model.backbone.layers:
        w = block.mixer.conv1d.weight
        assert w.abs().max() <= 0.01 and w.abs().max() > 0.005
    check_ssm_init(model)


@pytest.mark.parametrize("dt", [dict(dt_min=0.01, dt_max=0.01), dict(dt_min=0.01, dt_max=0.012),
                                dict(dt_min=0.001, dt_max=0.05, dt_init_floor=0.2)],
                         ids=["constant", "narrow", "all-floored"])
def test_fresh_model_with_a_narrow_dt_range_passes(config, dt):
    """A configured Δ range that is a single value, narrow, or entirely below dt_init_floor (every
    draw floored) gives close or equal Δ biases by construction: the guard must accept the fresh
    model (it refused it as 'overwritten' or 'outside the initial range')."""
    ssm = {**config.ssm_cfg, **dt}
    model = build_model(MambaLMConfig(**{**config.to_dict(), "ssm_cfg": ssm}), backend="reference")
    assert check_ssm_init(model) == config.n_layer
    mixer = model.backbone.layers[0].mixer
    bias = mixer.dt_proj.bias if config.layer == "Mamba1" else mixer.dt_bias
    with torch.no_grad():  # negative control: a zeroed bias is still caught
        bias.zero_()
    with pytest.raises(SSMInitError):
        check_ssm_init(model)
