"""transformers' hybrid families (Nemotron-H, Bamba, Falcon-H1) against transformers' own
implementation: models it builds from small configs with random weights, several layer patterns
per family, tied and untied embeddings."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from mamba_train.formats.load import load_model, read_weights  # noqa: E402
from mamba_train.formats.hf_export import export_hf
from mamba_train.formats.hf_family import ExportError  # noqa: E402
from mamba_train.models.build import build_model  # noqa: E402
from mamba_train.models.config import MambaLMConfig  # noqa: E402

VOCAB = 96
MAMBA = dict(time_step_limit=(0.0, float("inf")))


def nemotron_h(pattern: str, tie: bool, **kw):
    base = dict(model_type="nemotron_h", vocab_size=VOCAB, hidden_size=32,
                hybrid_override_pattern=pattern, tie_word_embeddings=tie, mamba_num_heads=4,
                mamba_head_dim=16, n_groups=2, ssm_state_size=8, conv_kernel=4, chunk_size=8,
                num_attention_heads=4, num_key_value_heads=2, head_dim=8, intermediate_size=48,
                layer_norm_epsilon=1e-5)
    return {**base, **kw}


def bamba(attn: list[int], tie: bool, layers: int = 3, **kw):
    base = dict(model_type="bamba", vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers,
                attn_layer_indices=attn, tie_word_embeddings=tie, mamba_n_heads=4,
                mamba_d_head=16, mamba_n_groups=2, mamba_d_state=8, mamba_chunk_size=8,
                num_attention_heads=4, num_key_value_heads=2, intermediate_size=48)
    return {**base, **kw}


def falcon_h1(tie: bool, layers: int = 2, **kw):
    base = dict(model_type="falcon_h1", vocab_size=VOCAB, hidden_size=32,
                num_hidden_layers=layers, tie_word_embeddings=tie, mamba_n_heads=3,
                mamba_d_head=16, mamba_d_ssm=48, mamba_n_groups=1, mamba_d_state=8,
                mamba_chunk_size=8, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                intermediate_size=40, embedding_multiplier=1.7, lm_head_multiplier=0.6,
                attention_in_multiplier=0.9, attention_out_multiplier=1.2, key_multiplier=0.8,
                ssm_in_multiplier=1.1, ssm_out_multiplier=0.7, mlp_multipliers=[0.9, 1.3],
                ssm_multipliers=[1.1, 0.9, 1.2, 0.8, 1.05])
    return {**base, **kw}


CASES = {
    "nemotron_h-M-M*--tied": nemotron_h("M-M*-", True),
    "nemotron_h-M*M-M-untied": nemotron_h("M*M-M-", False, time_step_limit=(0.01, 2.0)),
    "nemotron_h-MM-*": nemotron_h("MM-*", False, use_conv_bias=False, layer_norm_epsilon=1e-6),
    # SSM-only: Mamba2ForCausalLM could hold it too, but export keeps the family it came from
    "nemotron_h-MM-ssm-only": nemotron_h("MM", False),
    "bamba-attn1-untied": bamba([1], False, rms_norm_eps=1e-6),
    "bamba-attn02-tied": bamba([0, 2], True, time_step_limit=(0.0, 3.0)),
    "falcon_h1-untied": falcon_h1(False),
    "falcon_h1-tied-norm": falcon_h1(True, mamba_rms_norm=True, mamba_norm_before_gate=False),
    "falcon_h1-norm-before-gate": falcon_h1(False, layers=1, mamba_rms_norm=True,
                                            mamba_norm_before_gate=True, mamba_n_groups=3),
    # Falcon-H1's default RoPE spans the whole head whatever partial_rotary_factor says
    "falcon_h1-rope-factor-ignored": falcon_h1(False, layers=1, rope_parameters=dict(
        rope_type="default", rope_theta=500.0, partial_rotary_factor=0.5)),
    # Bamba's honours it: a quarter of the head, and the whole head in an attention-only model
    "bamba-quarter-rotary": bamba([1], False, layers=2, head_dim=16, rope_parameters=dict(
        rope_type="default", rope_theta=1e4, partial_rotary_factor=0.25)),
    "bamba-attention-only-full-rotary": bamba([0, 1], True, layers=2, head_dim=12,
                                              rope_parameters=dict(rope_type="default",
                                                                   partial_rotary_factor=1.0)),
}



def transformers_training_path_is_its_model(spec: dict) -> bool:
    """Whether transformers' model in training mode computes the same function as in eval mode.
    Not for Falcon-H1 with the gated norm before the gate: its training path hands mamba_ssm's
    fused kernel ``norm_before_gate=False`` whatever ``mamba_norm_before_gate`` says
    (``FalconH1Mixer.forward``, transformers/models/falcon_h1/modeling_falcon_h1.py), while its
    eval path applies ``FalconH1RMSNormGated`` as configured. tests/test_hf_hybrids_fused_cpu.py
    checks this statement against the installed transformers."""
    return not (spec["model_type"] == "falcon_h1" and spec.get("mamba_rms_norm")
                and spec.get("mamba_norm_before_gate", True))


def _randomise(model: torch.nn.Module) -> None:
    """Every parameter away from its init (norm scales too), small enough for sane logits."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith(("A_log", "D", "dt_bias")):
                p.copy_(torch.rand_like(p) + 0.2)
            else:
                p.normal_(std=0.08)


def make_hf(tmp_path, spec: dict, name: str = "src"):
    spec = dict(spec)
    model_type = spec.pop("model_type")
    config = transformers.AutoConfig.for_model(model_type, **spec)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    _randomise(model)
    out = tmp_path / name
    model.save_pretrained(out)
    return model, out


def _ids(batch=2, seqlen=21, seed=1):
    return torch.randint(0, VOCAB, (batch, seqlen), generator=torch.Generator().manual_seed(seed))


def _file_tensors(path):
    from safetensors.torch import load_file
    return load_file(path / "model.safetensors")


@pytest.mark.parametrize("case", sorted(CASES))
def test_load_model_gives_transformers_logits(tmp_path, case):
    hf, src = make_hf(tmp_path, CASES[case])
    ids = _ids()
    ours = load_model(src, backend="reference", device="cpu").eval()
    with torch.no_grad():
        want = hf(ids, use_cache=False).logits  # no cache to size without attention
        got = ours(ids).logits[..., :VOCAB]
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("case", sorted(CASES))
def test_export_returns_the_source_tensors(tmp_path, case):
    hf, src = make_hf(tmp_path, CASES[case])
    model = load_model(src, backend="reference", device="cpu")
    out = export_hf(model, tmp_path / "out")
    raw = json.loads((out / "config.json").read_text())
    assert raw["architectures"] == [type(hf).__name__]
    from mamba_train.formats.hf import decode_special_floats
    raw = decode_special_floats(raw)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id", "layer_norm_epsilon",
                "rms_norm_eps", "time_step_limit", "use_conv_bias", "mamba_conv_bias",
                "mamba_rms_norm", "mamba_norm_before_gate", "time_step_min", "time_step_max"):
        if hasattr(hf.config, key):
            want = getattr(hf.config, key)
            assert raw[key] == (list(want) if isinstance(want, tuple) else want), key
    # transformers' NemotronHForCausalLM never ties (no _tied_weights_keys): a tie_word_embeddings
    # flag over a head that differs from the embedding loads, and exports, untied
    emb = hf.get_input_embeddings().weight
    assert raw["tie_word_embeddings"] == (hf.config.tie_word_embeddings
                                          and torch.equal(hf.lm_head.weight, emb))
    want = {k: v for k, v in hf.state_dict().items()
            if not (k == "lm_head.weight" and hf.lm_head.weight is hf.get_input_embeddings().weight)}
    got = _file_tensors(out)
    assert sorted(got) == sorted(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    again = transformers.AutoModelForCausalLM.from_pretrained(out).float().eval()
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(again(ids, use_cache=False).logits,
                                   hf(ids, use_cache=False).logits, atol=0, rtol=0)


@pytest.mark.parametrize("case", ["nemotron_h-M-M*--tied", "bamba-attn1-untied", "falcon_h1-untied"])
def test_first_loss_equals_transformers_loss(tmp_path, case):
    hf, src = make_hf(tmp_path, CASES[case])
    ids = _ids(seed=3)
    labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)
    ours = load_model(src, backend="reference", device="cpu")
    with torch.no_grad():
        want = hf(ids, labels=ids).loss
        got = ours(ids, labels=labels).loss
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_a_model_no_family_represents_is_refused_naming_what_does_not_fit():
    cfg = MambaLMConfig(d_model=32, n_layer=2, vocab_size=VOCAB, layer_pattern="M-P-",
                        d_intermediate=64, ssm_cfg=dict(layer="Mamba2", headdim=16, d_state=8),
                        attn_cfg=dict(num_heads=4, causal=True))
    with pytest.raises(ExportError) as err:
        export_hf(build_model(cfg, backend="reference"), "/nonexistent-never-written")
    msg = str(err.value)
    for family in ("NemotronHForCausalLM", "BambaForCausalLM", "FalconH1ForCausalLM"):
        assert family in msg
    assert "layer_pattern" in msg


def test_family_init_survives_the_round_trip(tmp_path):
    _, src = make_hf(tmp_path, CASES["bamba-attn1-untied"])
    cfg, _ = read_weights(src)
    kw = cfg.mixer_kwargs()
    assert (kw["A_init"], kw["dt_bias_init"]) == ("arange", 1.0)
    model = build_model(cfg, backend="reference")
    mixer = model.backbone.layers[0].mixer
    assert torch.equal(mixer.dt_bias, torch.ones_like(mixer.dt_bias))
    assert torch.allclose(torch.exp(mixer.A_log), torch.arange(1.0, mixer.A_log.numel() + 1))
    from mamba_train.models.init import check_ssm_init
    assert check_ssm_init(model) == 2
    with torch.no_grad():
        mixer.dt_bias.zero_()
    with pytest.raises(Exception, match="dt_bias"):
        check_ssm_init(model)


def test_mamba_ssm_block_layout_exports_as_bamba_with_our_logits(tmp_path):
    # mamba_ssm's hybrid block (mixer, then the gated MLP) is Bamba's layer: built here, run by
    # transformers after export
    cfg = MambaLMConfig(d_model=32, n_layer=2, vocab_size=VOCAB, d_intermediate=128,
                        ssm_cfg=dict(layer="Mamba2", headdim=16, d_state=8, ngroups=2,
                                     chunk_size=8), tie_embeddings=False)
    torch.manual_seed(0)
    model = build_model(cfg, backend="reference").eval()
    _randomise(model)
    out = export_hf(model, tmp_path / "out")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).float().eval()
    assert type(hf).__name__ == "BambaForCausalLM"
    ids = _ids()
    with torch.no_grad():
        # use_cache=False: transformers' cache cannot size an attention mask for a Bamba
        # without attention layers
        torch.testing.assert_close(hf(ids, use_cache=False).logits, model(ids).logits[..., :VOCAB],
                                   atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("case", ["nemotron_h-M-M*--tied", "bamba-attn02-tied", "falcon_h1-untied"])
def test_packed_documents_equal_each_document_alone(tmp_path, case):
    _, src = make_hf(tmp_path, CASES[case])
    model = load_model(src, backend="reference", device="cpu").eval()
    lengths = [7, 9, 5]
    ids = _ids(batch=1, seqlen=sum(lengths), seed=5)
    seq_idx = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None].to(torch.int32)
    with torch.no_grad():
        packed = model(ids, seq_idx=seq_idx).logits
        alone = torch.cat([model(part).logits for part in ids.split(lengths, dim=1)], dim=1)
    torch.testing.assert_close(packed, alone, atol=2e-5, rtol=1e-4)


def test_an_odd_rotary_width_is_refused_in_one_line(tmp_path):
    _, src = make_hf(tmp_path, bamba([1], False, layers=2, head_dim=12, rope_parameters=dict(
        rope_type="default", partial_rotary_factor=0.25)))
    with pytest.raises(ExportError, match=r"partial_rotary_factor=0.25 of head_dim=12: an odd "
                                          r"rotary width \(3\)"):
        load_model(src, backend="reference", device="cpu")
