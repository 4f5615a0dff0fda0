"""AI21 Jamba (transformers' JambaForCausalLM) against transformers' own model built from small
configs with random weights (no downloads): logits, first loss (with the load-balancing term),
the experts each token is routed to, export back to the source's tensors, several layer patterns,
tied and untied; and the refusals of what Jamba cannot hold."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from test_hf_hybrids import VOCAB, _file_tensors, _ids, make_hf  # noqa: E402

from mamba_train.formats.hf_export import export_hf  # noqa: E402
from mamba_train.formats.hf_family import ExportError  # noqa: E402
from mamba_train.formats.hf_jamba import period_of  # noqa: E402
from mamba_train.formats.load import load_model  # noqa: E402
from mamba_train.models.build import build_model  # noqa: E402
from mamba_train.models.config import MambaLMConfig  # noqa: E402


def jamba(layers: int, attn: tuple[int, int], experts: tuple[int, int], tie: bool, **kw):
    base = dict(model_type="jamba", vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers,
                attn_layer_period=attn[0], attn_layer_offset=attn[1],
                expert_layer_period=experts[0], expert_layer_offset=experts[1], num_experts=4,
                num_experts_per_tok=2, intermediate_size=24, num_attention_heads=4,
                num_key_value_heads=2, mamba_d_state=8, mamba_dt_rank=4,
                router_aux_loss_coef=0.05, tie_word_embeddings=tie)
    return {**base, **kw}


CASES = {  # name: (spec, our pattern)
    "ME*-ME*--untied": (jamba(4, (2, 1), (2, 0), False), "ME*-ME*-"),
    "M-M-*EM-M--tied-biases": (jamba(5, (4, 2), (4, 2), True, num_experts=3, mamba_proj_bias=True,
                                     mamba_conv_bias=False, rms_norm_eps=1e-5), "M-M-*EM-M-"),
    "*EMEME-tied-all-experts": (jamba(3, (3, 0), (1, 0), True, head_dim=16, num_experts=5,
                                      num_experts_per_tok=3), "*EMEME"),
    "M-M-M--dense-untied": (jamba(3, (4, 3), (2, 1), False, num_experts=1), "M-M-M-"),
    # no Mamba layer: Granite could hold it too, but export keeps the family it came from
    "*-*--attention-only": (jamba(2, (1, 0), (3, 2), True, num_experts=1), "*-*-"),
}


def _labels(ids):
    return torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)


@pytest.mark.parametrize("case", sorted(CASES))
def test_load_model_gives_transformers_logits_and_pattern(tmp_path, case):
    spec, pattern = CASES[case]  # use_cache=False: no cache to size without attention
    hf, src = make_hf(tmp_path, spec)
    ours = load_model(src, backend="reference", device="cpu").eval()
    assert ours.config.layer_pattern == pattern
    assert not any(t.is_meta for t in ours.buffers())  # the MoE statistics too
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits[..., :VOCAB], hf(ids, use_cache=False).logits,
                                   atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("case", sorted(CASES))
def test_export_returns_the_source_tensors_and_transformers_loads_it(tmp_path, case):
    spec, _ = CASES[case]
    hf, src = make_hf(tmp_path, spec)
    out = export_hf(load_model(src, backend="reference", device="cpu"), tmp_path / "out")
    raw = json.loads((out / "config.json").read_text())
    assert raw["architectures"] == ["JambaForCausalLM"]
    for key in ("rms_norm_eps", "mamba_dt_rank",
                "mamba_proj_bias", "mamba_conv_bias", "tie_word_embeddings"):
        assert raw[key] == getattr(hf.config, key), key
    if hf.config.num_experts > 1:  # a dense model has no balancing loss to carry
        assert raw["router_aux_loss_coef"] == hf.config.router_aux_loss_coef
    # the smallest period that places the layers the same (5 layers: 3 with offset 2 == 4 with 2)
    written = transformers.JambaConfig.from_pretrained(out)
    assert written.layers_block_type == hf.config.layers_block_type
    assert written.layers_num_experts == hf.config.layers_num_experts
    want = hf.state_dict()
    if hf.config.tie_word_embeddings:
        want.pop("lm_head.weight")
    got = _file_tensors(out)
    assert sorted(got) == sorted(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    again = transformers.AutoModelForCausalLM.from_pretrained(out).float().eval()
    with torch.no_grad():
        torch.testing.assert_close(again(_ids(), use_cache=False).logits,
                                   hf(_ids(), use_cache=False).logits, atol=0, rtol=0)


def test_first_loss_with_the_balancing_term_equals_transformers(tmp_path):
    # one expert layer: transformers' load_balancing_loss_func is then the same Switch term as
    # ours (with several it averages f and P over the layers before multiplying them)
    spec, _ = CASES["M-M-*EM-M--tied-biases"]
    hf, src = make_hf(tmp_path, spec)
    ours = load_model(src, backend="reference", device="cpu")
    assert ours.config.moe_cfg["aux_loss_coef"] == 0.05
    ids = _ids(seed=3)
    with torch.no_grad():
        want = hf(ids, labels=ids, output_router_logits=True, use_cache=False)
        got = ours(ids, labels=_labels(ids)).loss
    assert float(want.aux_loss) > 0
    torch.testing.assert_close(got, want.loss, atol=1e-5, rtol=1e-5)


def test_first_loss_of_several_expert_layers_without_the_balancing_term(tmp_path):
    spec, _ = CASES["ME*-ME*--untied"]
    hf, src = make_hf(tmp_path, {**spec, "router_aux_loss_coef": 0.0})
    ours = load_model(src, backend="reference", device="cpu")
    ids = _ids(seed=4)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, labels=_labels(ids)).loss,
                                   hf(ids, labels=ids, use_cache=False).loss, atol=1e-5, rtol=1e-5)


def test_routing_is_transformers_and_deterministic(tmp_path):
    spec, _ = CASES["*EMEME-tied-all-experts"]
    hf, src = make_hf(tmp_path, spec)
    ours = load_model(src, backend="reference", device="cpu").eval()
    seen: dict[str, list[torch.Tensor]] = {"ours": [], "hf": []}
    hooks = [b.mlp.register_forward_hook(lambda m, a, o: seen["ours"].append(a[0].flatten(0, 1)))
             for b in ours.backbone.layers]
    hooks += [layer.feed_forward.register_forward_hook(
        lambda m, a, o: seen["hf"].append(a[0].flatten(0, 1))) for layer in hf.model.layers]
    ids = _ids(batch=3, seqlen=40)
    with torch.no_grad():
        first = ours(ids).logits
        hf(ids, use_cache=False)
        assert torch.equal(ours(ids).logits, first)
    for h in hooks:
        h.remove()
    assert len(seen["ours"]) == 2 * len(seen["hf"]) == 6  # ours also ran twice
    for layer, (x_ours, x_hf) in enumerate(zip(seen["ours"][:3], seen["hf"])):
        ours_idx = ours.backbone.layers[layer].mlp.router(x_ours)[3]
        hf_idx = hf.model.layers[layer].feed_forward.router(x_hf)[2]
        assert torch.equal(ours_idx, hf_idx), layer
        again = ours.backbone.layers[layer].mlp.router(seen["ours"][3 + layer])[3]
        assert torch.equal(ours_idx, again)


def test_experts_read_per_expert_or_stacked_alike(tmp_path):
    from mamba_train.formats.hf import read_hf
    from safetensors.torch import load_file

    spec, _ = CASES["ME*-ME*--untied"]
    hf, src = make_hf(tmp_path, spec)
    per_expert = load_file(src / "model.safetensors")
    assert "model.layers.0.feed_forward.experts.3.gate_proj.weight" in per_expert
    stacked = export_hf(load_model(src, backend="reference", device="cpu"), tmp_path / "out")
    assert "model.layers.0.feed_forward.experts.gate_up_proj" in _file_tensors(stacked)
    (_, a), (_, b) = read_hf(src), read_hf(stacked)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_period_of_finds_the_placement_or_none():
    assert period_of({4, 12, 20, 28}, 32) == (8, 4)  # Jamba 1.5: attention
    assert period_of(set(range(1, 32, 2)), 32) == (2, 1)  # Jamba 1.5: experts
    assert period_of(set(), 5) == (6, 5)
    assert period_of(set(range(5)), 5) == (1, 0)
    assert period_of({3}, 5) == (4, 3)
    assert period_of({1, 2}, 5) is None


def _jamba_cfg(**kw) -> MambaLMConfig:
    base = dict(d_model=32, n_layer=4, vocab_size=VOCAB, layer_pattern="M-ME*-ME",
                d_intermediate=24, norm_epsilon=1e-6,
                ssm_cfg=dict(d_state=8, dt_bc_norm=True, norm_eps=1e-6),
                attn_cfg=dict(num_heads=4, causal=True, qkv_proj_bias=False, out_proj_bias=False),
                mlp_cfg=dict(multiple_of=1),
                moe_cfg=dict(n_experts=4, top_k=2, d_expert=24, norm_topk_prob=False))
    return MambaLMConfig(**{**base, **kw})


@pytest.mark.parametrize("change,names", [
    (dict(layer_pattern="M-*-*EM-", n_layer=4), ["layer_pattern", "attn"]),
    (dict(moe_cfg=dict(n_experts=4, top_k=2, d_expert=24, norm_topk_prob=True)),
     ["norm_topk_prob"]),
    (dict(moe_cfg=dict(n_experts=4, top_k=2, d_expert=16, norm_topk_prob=False)), ["d_expert"]),
    (dict(ssm_cfg=dict(d_state=8)), ["dt_bc_norm"]),
    (dict(ssm_cfg=dict(d_state=8, dt_bc_norm=True)), ["norm_eps"]),
    (dict(attn_cfg=dict(num_heads=4, causal=True, rotary_emb_dim=8, qkv_proj_bias=False,
                        out_proj_bias=False)), ["rotary_emb_dim"]),
])
def test_a_model_no_family_represents_is_refused_naming_what_does_not_fit(change, names):
    model = build_model(_jamba_cfg(**change), backend="reference")
    with pytest.raises(ExportError) as err:
        export_hf(model, "/nonexistent-never-written")
    msg = str(err.value)
    assert "JambaForCausalLM" in msg and "MambaForCausalLM" in msg
    for name in names:
        assert name in msg


def test_the_refused_configs_base_exports(tmp_path):
    torch.manual_seed(0)
    model = build_model(_jamba_cfg(), backend="reference").eval()
    out = export_hf(model, tmp_path / "out")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).float().eval()
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids, use_cache=False).logits, model(ids).logits[..., :VOCAB],
                                   atol=2e-5, rtol=1e-4)


def test_mamba_with_dt_bc_norms_is_not_a_transformers_mamba():
    cfg = MambaLMConfig(d_model=32, n_layer=2, vocab_size=VOCAB,
                        ssm_cfg=dict(d_state=8, dt_bc_norm=True))
    with pytest.raises(ExportError, match="dt_bc_norm"):
        export_hf(build_model(cfg, backend="reference"), "/nonexistent-never-written")


@pytest.mark.slow
def test_init_from_trains_and_exports_the_source_tensors(tmp_path):
    import subprocess
    import sys

    from test_init_from import Capture, run

    spec, _ = CASES["M-M-*EM-M--tied-biases"]
    hf, src = make_hf(tmp_path, {**spec, "vocab_size": 4096, "eos_token_id": 0})
    cap = Capture()
    result = run(tmp_path, f"init_from={src}", "optim.lr=1e-12", "trainer.max_steps=2",
                 callbacks=[cap])
    assert result["trainer"].global_step == 2
    ids, labels = cap.batch["input_ids"], cap.batch["labels"]
    with torch.no_grad():
        out = hf(ids, output_router_logits=True, use_cache=False)
    ref = F.cross_entropy(out.logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
    ref = ref + hf.config.router_aux_loss_coef * out.aux_loss  # one expert layer: same term
    assert cap.loss == pytest.approx(float(ref), rel=1e-5, abs=1e-5)
    ckpt = sorted((tmp_path / "out").rglob("*.ckpt"))[-1]
    proc = subprocess.run([sys.executable, "-m", "mamba_train.export", f"ckpt={ckpt}",
                           f"out={tmp_path / 'exported'}", "format=hf"], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = _file_tensors(tmp_path / "exported")
    want = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}  # tied
    assert sorted(got) == sorted(want)
    for key, tensor in want.items():  # two AdamW steps of 1e-12: below fp32 resolution but at 0
        torch.testing.assert_close(got[key], tensor, rtol=0, atol=1e-10, msg=key)


def test_dt_bc_norm_weights_are_not_weight_decayed():
    from mamba_train.training.step.optim import no_weight_decay

    names = [n for n, _ in build_model(_jamba_cfg(), backend="reference").named_parameters()]
    norms = [n for n in names if n.endswith(("dt_norm.weight", "B_norm.weight", "C_norm.weight"))]
    assert len(norms) == 3 * 3 and all(no_weight_decay(n) for n in norms)
    assert not no_weight_decay("backbone.layers.0.mixer.x_proj.weight")


@pytest.mark.parametrize("family", ["jamba", "bamba", "granitemoehybrid"])
def test_a_source_whose_mlps_are_not_silu_is_refused_in_one_line(tmp_path, family):
    from test_hf_hybrids import bamba
    from test_moe_hf import granite

    spec = {"jamba": jamba(2, (2, 1), (2, 0), False), "bamba": bamba([1], False),
            "granitemoehybrid": granite(["mamba", "attention"])}[family]
    _, src = make_hf(tmp_path, {**spec, "hidden_act": "gelu"})
    with pytest.raises(ExportError, match=r"hidden_act='gelu': .* other than silu is not implemented"):
        load_model(src, backend="reference", device="cpu")
