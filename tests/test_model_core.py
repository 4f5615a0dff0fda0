"""Config validation and round-trips, the LM's structure, the chunked loss, optimizer groups."""

import json

import pytest
import torch
import torch.nn.functional as F

from mamba_train import MambaLMConfig, build_model
from mamba_train.models.backend import BackendError, resolve_backend
from mamba_train.models.config import ConfigError
from mamba_train.models.loss import IGNORE_INDEX, linear_cross_entropy
from mamba_train.training.step.optim import no_weight_decay, param_groups

TINY_M2 = dict(d_model=64, n_layer=2, vocab_size=250,
               ssm_cfg={"layer": "Mamba2", "d_state": 16, "headdim": 16, "chunk_size": 16})
HYBRID = dict(TINY_M2, n_layer=3, d_intermediate=96, attn_layer_idx=[1],
              attn_cfg={"causal": True, "num_heads": 4, "rotary_emb_dim": 8})


# ---------------------------------------------------------------- config
def test_config_json_round_trip_and_mamba_ssm_keys(tmp_path):
    cfg = MambaLMConfig(**HYBRID)
    cfg.save(tmp_path / "config.json")
    assert MambaLMConfig.load(tmp_path / "config.json") == cfg
    keys = set(json.loads((tmp_path / "config.json").read_text()))
    mamba_ssm_fields = {"d_model", "d_intermediate", "n_layer", "vocab_size", "ssm_cfg",
                        "attn_layer_idx", "attn_cfg", "rms_norm", "residual_in_fp32",
                        "fused_add_norm", "pad_vocab_size_multiple", "tie_embeddings"}
    assert keys == mamba_ssm_fields  # our extra fields only when non-default


def test_config_accepts_a_mamba_ssm_config_json():
    raw = {"d_model": 768, "d_intermediate": 0, "n_layer": 24, "vocab_size": 50277,
           "ssm_cfg": {"layer": "Mamba2"}, "attn_layer_idx": [], "attn_cfg": {},
           "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True,
           "pad_vocab_size_multiple": 8, "tie_embeddings": True}
    cfg = MambaLMConfig.from_dict(raw)
    assert cfg.padded_vocab_size == 50280 and cfg.layer == "Mamba2"


@pytest.mark.parametrize("override, message", [
    (dict(d_model=100, ssm_cfg={"layer": "Mamba2", "headdim": 64}), "divisible by ssm_cfg.headdim"),
    (dict(ssm_cfg={"layer": "Mamba2", "chunk_size": 100}), "power of two"),
    (dict(ssm_cfg={"layer": "Mamba4"}), "ssm_cfg.layer must be one of"),
    (dict(ssm_cfg={"layer": "Mamba1", "headdim": 64}), "does not take"),
    (dict(attn_layer_idx=[5]), "outside"),
    (dict(attn_layer_idx=[0], attn_cfg={"num_heads": 4}), "causal must be true"),
    (dict(n_layer=0), "n_layer must be a positive integer"),
    # sizes that would otherwise fail as a division by zero or a zero-width layer in the build
    (dict(ssm_cfg={"layer": "Mamba2", "ngroups": 0}), "ngroups must be a positive integer"),
    (dict(ssm_cfg={"layer": "Mamba2", "headdim": 0}), "headdim must be a positive integer"),
    (dict(ssm_cfg={"layer": "Mamba2", "d_conv": 0}), "d_conv must be a positive integer"),
    (dict(ssm_cfg={"layer": "Mamba2", "d_ssm": 256}), "d_ssm"),
    (dict(ssm_cfg={"layer": "Mamba2", "dt_limit": (0.5, 0.1)}), "dt_limit"),
    (dict(ssm_cfg={"layer": "Mamba1", "expand": 0}), "expand must be > 0"),
    (dict(ssm_cfg={"layer": "Mamba1", "dt_rank": 0}), "dt_rank must be a positive integer"),
    (dict(ssm_cfg={"layer": "Mamba1", "d_state": 0}), "d_state must be a positive integer"),
    (dict(ssm_cfg={"layer": "Mamba3", "headdim": 16, "ngroups": 0}), "ngroups must be a positive"),
    (dict(attn_layer_idx=[0], attn_cfg={"num_heads": 0, "causal": True}), "num_heads must be a"),
    (dict(attn_layer_idx=[0], attn_cfg={"num_heads": 2, "head_dim": 0, "causal": True}),
     "head_dim must be a positive integer"),
    (dict(ssm_cfg={"d_state": "abc"}), r"ssm_cfg.d_state must be a positive integer, got 'abc'"),
    (dict(attn_layer_idx=[0], attn_cfg={"num_head": 4, "causal": True}),
     r"model.attn_cfg has keys \['num_head'\] that attention does not take"),
])
def test_bad_configs_name_the_field(override, message):
    base = dict(d_model=64, n_layer=2, vocab_size=100)
    with pytest.raises(ConfigError, match=message):
        MambaLMConfig(**{**base, **override})


def test_unknown_config_json_key():
    with pytest.raises(ConfigError, match="unknown model config keys"):
        MambaLMConfig.from_dict({"d_model": 64, "n_layers": 2})


# ---------------------------------------------------------------- backend
def test_fused_backend_refused_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the refusal is for machines without it")
    with pytest.raises(BackendError, match="backend='fused' was requested but CUDA"):
        resolve_backend("fused")
    assert resolve_backend("auto") == "reference"
    with pytest.raises(BackendError, match="must be one of"):
        resolve_backend("cuda")


def test_import_does_not_pull_mamba_ssm_or_lightning():
    import subprocess
    import sys
    code = ("import sys, mamba_train; "
            "bad = [m for m in ('mamba_ssm', 'lightning', 'hydra') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------- model
def test_hybrid_model_structure_and_padding():
    model = build_model(MambaLMConfig(**HYBRID), backend="reference")
    keys = model.state_dict().keys()
    assert model.backbone.embedding.weight.shape == (256, 64)  # 250 padded to a multiple of 8
    assert "backbone.layers.1.mixer.in_proj.weight" in keys        # attention layer
    assert "backbone.layers.1.mixer.A_log" not in keys
    assert "backbone.layers.0.mixer.A_log" in keys                 # Mamba-2 layer
    assert "backbone.layers.2.norm2.weight" in keys and "backbone.layers.2.mlp.fc2.weight" in keys
    out = model(torch.randint(0, 250, (2, 20))).logits
    assert out.shape == (2, 20, 256)


def test_model_is_causal():
    """Changing a future token never changes earlier logits (all block types)."""
    torch.manual_seed(0)
    model = build_model(MambaLMConfig(**HYBRID), backend="reference").double()
    x = torch.randint(0, 250, (1, 40))
    y = x.clone()
    y[0, 25] = (y[0, 25] + 1) % 250
    a, b = model(x).logits, model(y).logits
    assert torch.allclose(a[:, :25], b[:, :25], atol=1e-12)
    assert not torch.allclose(a[:, 25:], b[:, 25:])


def test_untied_embeddings():
    model = build_model(MambaLMConfig(**TINY_M2, tie_embeddings=False), backend="reference")
    assert model.lm_head.weight is not model.backbone.embedding.weight
    assert "lm_head.weight" in model.state_dict()


# ---------------------------------------------------------------- loss
@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_linear_cross_entropy_matches_full_logits(chunk):
    torch.manual_seed(0)
    h = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 37, (50,))
    t[::5] = IGNORE_INDEX
    loss = linear_cross_entropy(h, w, t, chunk_size=chunk)
    ref = F.cross_entropy(h @ w.t(), t, ignore_index=IGNORE_INDEX)
    assert torch.allclose(loss, ref, rtol=1e-12)
    g = torch.autograd.grad(loss * 3.0, (h, w))
    g_ref = torch.autograd.grad(ref * 3.0, (h, w))
    for a, b in zip(g, g_ref):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_model_loss_equals_cross_entropy_of_logits():
    torch.manual_seed(0)
    model = build_model(MambaLMConfig(**TINY_M2), backend="reference")
    x = torch.randint(0, 250, (2, 33))
    logits = model(x[:, :-1]).logits
    ref = F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
    loss = model(x[:, :-1], labels=x[:, 1:], loss_chunk_size=10).loss
    assert torch.allclose(loss, ref, rtol=1e-5)
    assert loss.item() == pytest.approx(torch.log(torch.tensor(256.0)).item(), rel=0.1)


# ---------------------------------------------------------------- optimizer groups
@pytest.mark.parametrize("cfg", [dict(d_model=64, n_layer=2, vocab_size=100), TINY_M2, HYBRID])
def test_param_groups_partition_by_name(cfg):
    model = build_model(MambaLMConfig(**cfg), backend="reference")
    groups = param_groups(model, weight_decay=0.1)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len({id(p) for p in model.parameters()})
    decay_names = set(groups[0]["param_names"])
    no_decay_names = set(groups[1]["param_names"])
    for name in no_decay_names:
        assert name.endswith(("A_log", ".D", "dt_bias", ".bias", "norm.weight", "norm2.weight",
                              "norm_f.weight")), name
    for name in decay_names:
        assert name.endswith((".weight")) and "norm" not in name.split(".")[-2], name
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0


def test_no_weight_decay_rule_on_mamba_ssm_names():
    assert no_weight_decay("backbone.layers.3.mixer.A_log")
    assert no_weight_decay("backbone.layers.3.mixer.D")
    assert no_weight_decay("backbone.layers.3.mixer.dt_bias")
    assert no_weight_decay("backbone.layers.3.mixer.dt_proj.bias")
    assert no_weight_decay("backbone.layers.3.mixer.norm.weight")
    assert no_weight_decay("model.backbone.norm_f.weight")
    assert not no_weight_decay("backbone.layers.3.mixer.dt_proj.weight")
    assert not no_weight_decay("backbone.layers.3.mixer.conv1d.weight")
    assert not no_weight_decay("backbone.layers.3.mixer.Dx.weight")
    assert not no_weight_decay("backbone.embedding.weight")


@pytest.mark.parametrize("wrapper", ["", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.",
                                     "_fsdp_wrapped_module._checkpoint_wrapped_module."])
def test_decay_rule_survives_wrapper_prefixes(wrapper):
    """FSDP (use_orig_params) and activation checkpointing insert module names; the SSM
    parameters must stay out of weight decay under every strategy's naming."""
    model = build_model(MambaLMConfig(**HYBRID), backend="reference")
    for name, _ in model.named_parameters():
        parts = name.split(".")
        wrapped = ".".join(parts[:3]) + "." + wrapper + ".".join(parts[3:]) if len(parts) > 3 else name
        assert no_weight_decay(wrapped) == no_weight_decay(name), wrapped


def test_a_key_the_model_config_does_not_take_is_one_line():
    """+model.d_modell=64 was Hydra's multi-line InstantiationException."""
    from omegaconf import OmegaConf

    from mamba_train.errors import UnknownSettingError, instantiate_config

    cfg = OmegaConf.create({"model": {"_target_": "mamba_train.models.config.MambaLMConfig",
                                      "d_model": 64, "n_layer": 1, "vocab_size": 100, "d_modell": 3}})
    with pytest.raises(UnknownSettingError, match=r"^model.d_modell is not a setting of "
                                                  r"mamba_train.models.config.MambaLMConfig"):
        instantiate_config(cfg.model)
