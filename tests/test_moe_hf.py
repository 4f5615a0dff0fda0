"""Mixture-of-experts hybrids against transformers' own models (random weights from small
configs, no downloads): Nemotron 3 (NemotronHForCausalLM with moe layers) loads with its logits
and first loss, and exports back to the source's tensors."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_hf_hybrids import VOCAB, _file_tensors, _ids, _randomise, nemotron_h  # noqa: E402

from mamba_train.formats.load import load_model  # noqa: E402
from mamba_train.formats.hf_export import export_hf  # noqa: E402
from mamba_train.formats.hf_family import ExportError  # noqa: E402

NEMOTRON_MOE = dict(n_routed_experts=8, num_experts_per_tok=3, moe_intermediate_size=24,
                    moe_shared_expert_intermediate_size=40, n_group=4, topk_group=2,
                    routed_scaling_factor=2.5, mlp_hidden_act="relu2")
CASES = {
    "ME*E-normalised": nemotron_h("ME*E", False, **NEMOTRON_MOE),
    "MEM*E-M--raw-one-group": nemotron_h("MEM*E-M-", False, **{**NEMOTRON_MOE, "n_group": 1,
                                                              "topk_group": 1,
                                                              "norm_topk_prob": False}),
}


def make_hf(tmp_path, spec: dict):
    spec = dict(spec)
    config = transformers.AutoConfig.for_model(spec.pop("model_type"), **spec)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    _randomise(model)
    with torch.no_grad():  # a trained correction bias: it changes which experts are chosen
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.normal_(std=0.3)
    model.save_pretrained(tmp_path / "src")
    return model, tmp_path / "src"


@pytest.mark.parametrize("case", sorted(CASES))
def test_nemotron_moe_loads_with_transformers_logits_and_loss(tmp_path, case):
    hf, src = make_hf(tmp_path, CASES[case])
    ours = load_model(src, backend="reference", device="cpu").eval()
    assert ours.config.n_moe_layers == CASES[case]["hybrid_override_pattern"].count("E")
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits[..., :VOCAB], hf(ids).logits,
                                   atol=2e-5, rtol=1e-4)
        want = hf(ids, labels=ids).loss
        labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)
        torch.testing.assert_close(ours(ids, labels=labels).loss, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", sorted(CASES))
def test_nemotron_moe_export_returns_the_source_tensors(tmp_path, case):
    hf, src = make_hf(tmp_path, CASES[case])
    out = export_hf(load_model(src, backend="reference", device="cpu"), tmp_path / "out")
    raw = json.loads((out / "config.json").read_text())
    assert raw["architectures"] == ["NemotronHForCausalLM"]
    want, got = hf.state_dict(), _file_tensors(out)
    assert sorted(got) == sorted(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    again = transformers.AutoModelForCausalLM.from_pretrained(out).float().eval()
    with torch.no_grad():
        torch.testing.assert_close(again(_ids()).logits, hf(_ids()).logits, atol=0, rtol=0)


def test_export_refuses_experts_nemotron_h_cannot_hold(tmp_path):
    hf, src = make_hf(tmp_path, CASES["ME*E-normalised"])
    model = load_model(src, backend="reference", device="cpu")
    model.config.moe_cfg["router"] = "softmax"
    model.config.moe_cfg.update(n_group=1, topk_group=1, score_correction_bias=False)
    with pytest.raises(ExportError, match="router"):
        export_hf(model, tmp_path / "out")


def granite(layer_types, **kw):
    base = dict(model_type="granitemoehybrid", vocab_size=VOCAB, hidden_size=32,
                num_hidden_layers=len(layer_types), layer_types=layer_types, mamba_n_heads=4,
                mamba_d_head=16, mamba_n_groups=2, mamba_d_state=8, mamba_chunk_size=8,
                num_attention_heads=4, num_key_value_heads=2, intermediate_size=24,
                shared_intermediate_size=40, num_local_experts=4, num_experts_per_tok=2,
                embedding_multiplier=3.0, residual_multiplier=0.4, attention_multiplier=0.2,
                logits_scaling=2.5, tie_word_embeddings=False)
    return {**base, **kw}


GRANITE_CASES = {
    "rope-moe": granite(["mamba", "attention", "mamba"]),
    "nope-moe-tied": granite(["attention", "mamba"], position_embedding_type="nope",
                             tie_word_embeddings=True),
    "dense": granite(["mamba", "attention"], num_local_experts=0),
    # its attention reads config.head_dim when set; its RoPE ignores partial_rotary_factor
    "head-dim-rope-factor": granite(["attention", "mamba"], head_dim=12,
                                    position_embedding_type="rope",
                                    rope_parameters=dict(rope_type="default", rope_theta=300.0,
                                                         partial_rotary_factor=0.5)),
    # no Mamba layer: the mamba_* fields are still written for GraniteMoeHybridConfig to accept
    "attention-only": granite(["attention", "attention"], num_local_experts=0),
}


@pytest.mark.parametrize("case", sorted(GRANITE_CASES))
def test_granite_loads_with_transformers_logits_and_exports_its_tensors(tmp_path, case):
    hf, src = make_hf(tmp_path, GRANITE_CASES[case])
    ours = load_model(src, backend="reference", device="cpu").eval()
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits[..., :VOCAB], hf(ids).logits,
                                   atol=2e-5, rtol=1e-4)
        labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)
        # the load-balancing loss is added by transformers only with output_router_logits
        ours.config.moe_cfg["aux_loss_coef"] = 0.0
        for block in ours.backbone.layers:
            if hasattr(block.mlp, "cfg"):
                block.mlp.cfg["aux_loss_coef"] = 0.0
        torch.testing.assert_close(ours(ids, labels=labels).loss, hf(ids, labels=ids).loss,
                                   atol=1e-5, rtol=1e-5)
    out = export_hf(load_model(src, backend="reference", device="cpu"), tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["architectures"] == [type(hf).__name__]
    want, got = hf.state_dict(), _file_tensors(out)
    if hf.config.tie_word_embeddings:
        want.pop("lm_head.weight")
    assert sorted(got) == sorted(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    again = transformers.AutoModelForCausalLM.from_pretrained(out).float().eval()
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, hf(ids).logits, atol=0, rtol=0)


@pytest.mark.parametrize("family", ["BambaForCausalLM", "GraniteMoeHybridForCausalLM"])
def test_a_mamba2_without_the_gated_norm_is_refused_naming_rmsnorm(family):
    from mamba_train.formats.hf import FAMILIES
    from mamba_train.models.config import MambaLMConfig

    cfg = MambaLMConfig(d_model=32, n_layer=2, vocab_size=VOCAB, layer_pattern="M-*-",
                        d_intermediate=48, mlp_cfg=dict(multiple_of=1),
                        ssm_cfg=dict(layer="Mamba2", headdim=16, d_state=8, rmsnorm=False),
                        attn_cfg=dict(num_heads=4, causal=True, rotary_emb_dim=8))
    fam = next(f for f in FAMILIES.values() if f.architecture == family)
    with pytest.raises(ExportError, match=f"rmsnorm=false.*{family}"):
        fam.config_fields(cfg)


def test_shared_expert_biases_are_refused_in_one_line(tmp_path):
    _, src = make_hf(tmp_path, {**CASES["ME*E-normalised"], "mlp_bias": True})
    with pytest.raises(ExportError, match="mlp_bias=true with moe layers: .*shared experts biases"):
        load_model(src, backend="reference", device="cpu")
