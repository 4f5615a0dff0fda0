"""Export to / import from Hugging Face transformers (``MambaForCausalLM`` / ``Mamba2ForCausalLM``).

Everything runs on CPU with tiny models: our reference model and transformers' own PyTorch
fallback must produce the same logits from the exported directory, and every tensor must
survive export -> import bit for bit.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402

from mamba_train import MambaLMConfig, build_model, load_model  # noqa: E402
from mamba_train.formats.hf import (  # noqa: E402
    STASH_KEY,
    ExportError,
    from_hf_state_dict,
    read_hf,
    to_hf_config,
)
from mamba_train.formats.hf_export import export_hf  # noqa: E402
from mamba_train.formats.hf_mamba import MAMBA  # noqa: E402

hf_key = MAMBA.hf_key  # Mamba and Mamba-2 rename the same prefix

REPO = Path(__file__).resolve().parents[1]

MAMBA2_SSM = {"layer": "Mamba2", "headdim": 16, "d_state": 16, "chunk_size": 16, "ngroups": 2}
CONFIGS = {
    # vocab 1001 -> embedding padded to 1008: HF must get the padded size
    "mamba1": dict(d_model=64, n_layer=2, vocab_size=1001),
    "mamba2": dict(d_model=64, n_layer=2, vocab_size=1001, ssm_cfg=MAMBA2_SSM),
    # the other branches of the mapping: untied head, in/out_proj bias, no conv bias,
    # explicit dt_rank, residual in the compute dtype, non-default eps (Mamba-1 only)
    "mamba1_untied": dict(d_model=64, n_layer=3, vocab_size=1000, tie_embeddings=False,
                          residual_in_fp32=False, norm_epsilon=1e-6,
                          ssm_cfg={"bias": True, "conv_bias": False, "dt_rank": 8,
                                   "d_state": 8, "d_conv": 3}),
    "mamba2_untied": dict(d_model=64, n_layer=3, vocab_size=1000, tie_embeddings=False,
                          ssm_cfg={**MAMBA2_SSM, "bias": True, "conv_bias": False, "ngroups": 4,
                                   "dt_limit": (0.0005, 0.5), "chunk_size": 8}),
    # an explicit inner width (not expand * d_model): transformers gets expand = 3
    "mamba2_d_inner": dict(d_model=64, n_layer=2, vocab_size=1000,
                           ssm_cfg={**MAMBA2_SSM, "d_inner": 192}),
}
SSM_PARAMS = ("dt_proj.bias", "dt_bias", "A_log", ".D")


def perturbed_model(cfg: MambaLMConfig, seed: int = 0):
    """A reference model whose every tensor differs from any init (D != 1, norms != 1, ...).

    A freshly initialised model has D == 1, norm weights == 1 and (Mamba-1) A_log == log(1..N)
    in every channel: a mis-mapped or re-initialised tensor would go unnoticed. Training moves
    them, so do we.
    """
    torch.manual_seed(seed)
    model = build_model(cfg, backend="reference").eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def exported(request, tmp_path_factory):
    cfg = MambaLMConfig(**CONFIGS[request.param])
    model = perturbed_model(cfg)
    out = tmp_path_factory.mktemp(request.param)
    export_hf(model, out)
    return request.param, cfg, model, out


def load_hf(path, **kwargs):
    return transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, **kwargs).eval()


# ------------------------------------------------------------------------------ export -> HF
def test_export_files_and_config(exported):
    name, cfg, model, out = exported
    assert {"config.json", "model.safetensors"} <= {p.name for p in out.iterdir()}
    raw = json.loads((out / "config.json").read_text())
    mamba2 = cfg.layer == "Mamba2"
    assert raw["model_type"] == ("mamba2" if mamba2 else "mamba")
    assert raw["vocab_size"] == cfg.padded_vocab_size == model.backbone.embedding.weight.shape[0]
    assert raw["hidden_size"] == cfg.d_model and raw["num_hidden_layers"] == cfg.n_layer
    assert raw["tie_word_embeddings"] == cfg.tie_embeddings
    assert raw["residual_in_fp32"] == cfg.residual_in_fp32
    assert raw["layer_norm_epsilon"] == cfg.norm_epsilon
    kw = cfg.mixer_kwargs()
    assert raw["state_size"] == kw["d_state"] and raw["conv_kernel"] == kw["d_conv"]
    assert raw["use_bias"] == kw["bias"] and raw["use_conv_bias"] == kw["conv_bias"]
    if mamba2:
        assert raw["num_heads"] * kw["headdim"] == cfg.ssm_d_inner == raw["expand"] * cfg.d_model
        assert raw["head_dim"] == kw["headdim"] and raw["n_groups"] == kw["ngroups"]
        assert raw["chunk_size"] == kw["chunk_size"]
    else:
        assert raw["time_step_rank"] == kw["dt_rank"]
    # see test_hf_rescale_prenorm_residual_rescales_trained_weights_on_load
    assert raw["rescale_prenorm_residual"] is False
    assert MambaLMConfig.from_dict(raw[STASH_KEY]).to_dict() == cfg.to_dict()
    # tied head is not stored (transformers re-ties it); an untied one is
    keys = set(load_file(out / "model.safetensors"))
    assert ("lm_head.weight" in keys) == (not cfg.tie_embeddings)
    assert "backbone.embeddings.weight" in keys and "backbone.embedding.weight" not in keys


def test_hf_logits_match(exported):
    name, cfg, model, out = exported
    hf = load_hf(out)
    expected_cls = "Mamba2ForCausalLM" if cfg.layer == "Mamba2" else "MambaForCausalLM"
    assert type(hf).__name__ == expected_cls
    # 37: not a multiple of the Mamba-2 chunk size
    ids = torch.randint(0, cfg.vocab_size, (2, 37), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = model(ids).logits
        theirs = hf(ids).logits
    assert theirs.shape == ours.shape == (2, 37, cfg.padded_vocab_size)
    diff = (ours - theirs).abs().max().item()
    assert diff < 1e-4, f"{name}: max |logits diff| = {diff}"
    assert ours.abs().max() > 1e-2  # not a vacuous comparison of zeros


def test_hf_loaded_weights_are_bit_identical(exported):
    """transformers >= 5 runs ``_init_weights`` again after ``from_pretrained``; the Δ bias, A_log
    and D it would draw are guarded by its ``init.*`` helpers and must come through untouched."""
    name, cfg, model, out = exported
    hf_state = load_hf(out).state_dict()
    ours = model.state_dict()
    ssm_checked = 0
    for key, tensor in ours.items():
        theirs = hf_state[hf_key(key)]
        assert theirs.dtype == tensor.dtype, key
        assert torch.equal(theirs, tensor), f"{name}: transformers changed {key} on load"
        ssm_checked += any(s in key for s in SSM_PARAMS)
    assert ssm_checked == 3 * cfg.n_layer  # dt bias, A_log, D of every layer
    assert set(hf_state) == {hf_key(k) for k in ours}


def test_hf_rescale_prenorm_residual_rescales_trained_weights_on_load(exported, tmp_path):
    """Why export writes ``rescale_prenorm_residual: false``: with it true, transformers 5.x
    divides the *loaded* out_proj weights by sqrt(num_hidden_layers) (its ``_init_weights`` runs
    after loading and that division is not guarded), while dt bias / A_log / D stay intact.
    If this test fails, transformers fixed it and the override in hf.py is merely harmless."""
    name, cfg, model, out = exported
    for f in out.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    raw = json.loads((tmp_path / "config.json").read_text())
    raw["rescale_prenorm_residual"] = True
    (tmp_path / "config.json").write_text(json.dumps(raw))
    hf_state = load_hf(tmp_path).state_dict()
    for key, tensor in model.state_dict().items():
        theirs = hf_state[hf_key(key)]
        if key.endswith("out_proj.weight"):
            torch.testing.assert_close(theirs, tensor / math.sqrt(cfg.n_layer))
        else:
            assert torch.equal(theirs, tensor), key


# ------------------------------------------------------------------------------ round trip
def test_round_trip_through_load_model(exported):
    name, cfg, model, out = exported
    loaded = load_model(out, backend="reference")
    # the stashed config restores what HF has no field for (unpadded vocab, init knobs)
    assert loaded.config.to_dict() == cfg.to_dict()
    ours, back = model.state_dict(), loaded.state_dict()
    assert set(ours) == set(back)
    for key in ours:
        assert back[key].dtype == ours[key].dtype, key
        assert torch.equal(back[key], ours[key]), key
    if cfg.tie_embeddings:
        assert loaded.lm_head.weight is loaded.backbone.embedding.weight


def test_read_hf_without_stash_uses_hf_fields(exported, tmp_path):
    """A directory edited/written elsewhere (no ``mamba_train_config``) still loads exactly:
    the vocabulary is then the padded embedding size."""
    name, cfg, model, out = exported
    for f in out.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    raw = json.loads((tmp_path / "config.json").read_text())
    del raw[STASH_KEY]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    got_cfg, state = read_hf(tmp_path)
    assert got_cfg.vocab_size == cfg.padded_vocab_size
    assert got_cfg.padded_vocab_size == cfg.padded_vocab_size
    as_json = lambda d: json.loads(json.dumps(d))  # noqa: E731  (tuples vs lists)
    assert got_cfg.layer == cfg.layer
    def width_free(c):  # an explicit d_inner comes back as transformers' integer expand
        return {k: v for k, v in as_json(c.mixer_kwargs()).items() if k not in ("d_inner", "expand")}
    assert width_free(got_cfg) == width_free(cfg) and got_cfg.ssm_d_inner == cfg.ssm_d_inner
    assert got_cfg.tie_embeddings == cfg.tie_embeddings
    assert got_cfg.norm_epsilon == cfg.norm_epsilon
    assert got_cfg.residual_in_fp32 == cfg.residual_in_fp32
    loaded = load_model(tmp_path, backend="reference")
    for key, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key


def test_edited_hf_config_wins_over_stash(exported, tmp_path, caplog):
    name, cfg, model, out = exported
    raw = json.loads((out / "config.json").read_text())
    raw["num_hidden_layers"] = cfg.n_layer - 1  # e.g. someone pruned the last layer
    (tmp_path / "config.json").write_text(json.dumps(raw))
    from mamba_train.formats.hf import read_hf_config
    got = read_hf_config(tmp_path)
    assert got.n_layer == cfg.n_layer - 1
    assert "num_hidden_layers" in caplog.text


def test_export_from_lightning_checkpoint(tmp_path):
    """``export_hf`` takes any path ``read_weights`` reads; a mamba_train .ckpt included."""
    from mamba_train.formats.checkpoint import CKPT_CONFIG_KEY, CKPT_MODEL_PREFIX

    cfg = MambaLMConfig(**CONFIGS["mamba1_untied"])
    model = perturbed_model(cfg)
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": {CKPT_MODEL_PREFIX + k: v for k, v in model.state_dict().items()},
                CKPT_CONFIG_KEY: cfg.to_dict()}, ckpt)
    export_hf(ckpt, tmp_path / "hf")
    hf_state = load_hf(tmp_path / "hf").state_dict()
    for key, tensor in model.state_dict().items():
        assert torch.equal(hf_state[hf_key(key)], tensor), key


def test_export_bfloat16(tmp_path):
    cfg = MambaLMConfig(**CONFIGS["mamba2"])
    model = perturbed_model(cfg)
    export_hf(model, tmp_path, dtype="bfloat16")
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    assert {t.dtype for t in load_file(tmp_path / "model.safetensors").values()} == {torch.bfloat16}
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert hf.dtype == torch.bfloat16
    loaded = load_model(tmp_path, backend="reference")
    for key, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor.to(torch.bfloat16)), key


# ------------------------------------------------------------------------------ HF -> ours
@pytest.mark.parametrize("layer", ["mamba", "mamba2"])
@pytest.mark.parametrize("layout", ["single", "sharded", "bin"])
def test_import_model_saved_by_transformers(layer, layout, tmp_path):
    """A directory written by transformers itself (no stash): weights read without building the
    HF model, logits equal."""
    torch.manual_seed(0)
    if layer == "mamba":
        hf_cfg = transformers.MambaConfig(hidden_size=64, num_hidden_layers=2, vocab_size=512,
                                          state_size=8, time_step_rank=6)
        hf = transformers.MambaForCausalLM(hf_cfg)
    else:
        hf_cfg = transformers.Mamba2Config(hidden_size=64, num_hidden_layers=2, vocab_size=512,
                                           num_heads=8, head_dim=16, n_groups=2, state_size=16,
                                           chunk_size=16)
        hf = transformers.Mamba2ForCausalLM(hf_cfg)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.1 * torch.randn_like(p))
    hf.eval()
    if layout == "single":
        hf.save_pretrained(tmp_path)
    elif layout == "sharded":
        hf.save_pretrained(tmp_path, max_shard_size="100KB")
        assert (tmp_path / "model.safetensors.index.json").is_file()
    else:
        state = {k: v.clone() for k, v in hf.state_dict().items()}
        if hf_cfg.tie_word_embeddings:
            state.pop("lm_head.weight")
        hf_cfg.save_pretrained(tmp_path)
        torch.save(state, tmp_path / "pytorch_model.bin")
    cfg, _ = read_hf(tmp_path)
    assert cfg.layer == ("Mamba2" if layer == "mamba2" else "Mamba1")
    assert cfg.tie_embeddings == hf_cfg.tie_word_embeddings  # Mamba2Config defaults to untied
    model = load_model(tmp_path, backend="reference").eval()
    hf_state = hf.state_dict()
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, hf_state[hf_key(key)]), key
    ids = torch.randint(0, 512, (2, 21))
    with torch.no_grad():
        diff = (model(ids).logits - hf(ids).logits).abs().max().item()
    assert diff < 1e-4


@pytest.mark.parametrize("layer", ["mamba", "mamba2"])
def test_transformers_eps_and_special_ids_survive_import_and_export(layer, tmp_path):
    """A transformers Mamba/Mamba-2 directory with a non-default layer_norm_epsilon (which
    Mamba-2 also uses in its gated RMSNorm: our ssm_cfg.norm_eps) and its own bos/eos/pad ids:
    loaded, it gives transformers' logits; exported, it is the same model with the same ids."""
    common = dict(hidden_size=32, num_hidden_layers=2, vocab_size=77, state_size=8,
                  layer_norm_epsilon=1e-2, bos_token_id=5, eos_token_id=[7, 9], pad_token_id=3)
    if layer == "mamba":
        hf_cfg = transformers.MambaConfig(**common)
    else:
        hf_cfg = transformers.Mamba2Config(**common, num_heads=8, head_dim=8, n_groups=2,
                                           chunk_size=8)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(hf_cfg).float().eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():  # small activations: the eps matters
            p.copy_(0.05 * torch.randn_like(p) + (1.0 if name.endswith("norm.weight") else 0.0))
    hf.save_pretrained(tmp_path / "src")
    ids = torch.randint(0, 77, (2, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = hf(ids, use_cache=False).logits
        model = load_model(tmp_path / "src", backend="reference").eval()
        torch.testing.assert_close(model(ids).logits[..., :77], want, rtol=0, atol=2e-5)
    out = export_hf(model, tmp_path / "out")
    raw = json.loads((out / "config.json").read_text())
    assert (raw["layer_norm_epsilon"], raw["bos_token_id"], raw["eos_token_id"],
            raw["pad_token_id"]) == (1e-2, 5, [7, 9], 3)
    again = transformers.AutoModelForCausalLM.from_pretrained(out).float().eval()
    with torch.no_grad():
        assert torch.equal(again(ids, use_cache=False).logits, want)


def test_inconsistent_tied_head_is_refused():
    cfg = MambaLMConfig(**CONFIGS["mamba1"])
    state = {"backbone.embeddings.weight": torch.zeros(3, 2), "lm_head.weight": torch.ones(3, 2)}
    with pytest.raises(ExportError, match="tie_word_embeddings"):
        from_hf_state_dict(cfg, state)
    state["lm_head.weight"] = torch.zeros(3, 2)
    assert set(from_hf_state_dict(cfg, state)) == {"backbone.embedding.weight"}


# ------------------------------------------------------------------------------ refusals
REFUSED = [
    (dict(d_intermediate=128), "d_intermediate"),
    (dict(attn_layer_idx=[1], attn_cfg={"num_heads": 4, "causal": True}), "attn_layer_idx"),
    (dict(rms_norm=False), "rms_norm"),
    (dict(ssm_cfg={**MAMBA2_SSM, "d_ssm": 64}), "d_ssm"),
    (dict(ssm_cfg={**MAMBA2_SSM, "d_inner": 96}), "d_inner"),
    (dict(ssm_cfg={**MAMBA2_SSM, "D_has_hdim": True}), "D_has_hdim"),
    (dict(ssm_cfg={**MAMBA2_SSM, "rmsnorm": False}), "rmsnorm"),
    (dict(ssm_cfg={**MAMBA2_SSM, "norm_before_gate": True}), "norm_before_gate"),
    (dict(ssm_cfg=MAMBA2_SSM, norm_epsilon=1e-6), "norm_epsilon"),
]


@pytest.mark.parametrize("overrides,field", REFUSED, ids=[f for _, f in REFUSED])
def test_unrepresentable_configs_are_refused(overrides, field):
    cfg = MambaLMConfig(**{**dict(d_model=64, n_layer=2, vocab_size=1000), **overrides})
    with pytest.raises(ExportError, match=field):
        to_hf_config(cfg)


def test_export_of_hybrid_model_no_family_holds_raises_and_writes_nothing(tmp_path):
    # mamba_ssm's MHA has q/k/v/o biases and no rotary: neither Nemotron-H (no biases) nor
    # Bamba (half-head rotary) nor Falcon-H1 (parallel layers) computes it
    overrides, _ = REFUSED[1]
    cfg = MambaLMConfig(**{**CONFIGS["mamba2"], **overrides})
    model = build_model(cfg, backend="reference")
    out = tmp_path / "out"
    with pytest.raises(ExportError, match="NemotronHForCausalLM.*BambaForCausalLM") as info:
        export_hf(model, out)
    assert isinstance(info.value, ValueError)
    assert not out.exists() or not any(out.iterdir())


def test_export_refuses_directory_with_other_weights(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"old")
    model = perturbed_model(MambaLMConfig(**CONFIGS["mamba1"]))
    with pytest.raises(ExportError, match="pytorch_model.bin"):
        export_hf(model, tmp_path)


# ------------------------------------------------------------------------------ tokenizer
def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<|endoftext|>": 0, "<pad>": 1, "[UNK]": 2, "hello": 3, "world": 4}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
        pad_token="<pad>", unk_token="[UNK]")


def test_export_with_tokenizer(tmp_path):
    model = perturbed_model(MambaLMConfig(**CONFIGS["mamba1"]))
    tok_dir = tmp_path / "tok"
    tiny_tokenizer().save_pretrained(tok_dir)
    out = tmp_path / "hf"
    export_hf(model, out, tokenizer=str(tok_dir))  # a path, as the CLI passes it
    raw = json.loads((out / "config.json").read_text())
    assert (raw["bos_token_id"], raw["eos_token_id"], raw["pad_token_id"]) == (0, 0, 1)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok("hello world")["input_ids"] == [3, 4]
    hf = load_hf(out)
    assert hf.config.eos_token_id == 0


def test_export_refuses_tokenizer_larger_than_embedding(tmp_path):
    model = perturbed_model(MambaLMConfig(d_model=32, n_layer=1, vocab_size=3,
                                          pad_vocab_size_multiple=1))
    with pytest.raises(ExportError, match="tokenizer has 5 tokens"):
        export_hf(model, tmp_path, tokenizer=tiny_tokenizer())


# ------------------------------------------------------------------------------ CLI
def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "mamba_train.export", *args],
                          capture_output=True, text=True, cwd=REPO, timeout=300)


def test_cli_mamba_ssm_to_hf_and_back(tmp_path):
    cfg = MambaLMConfig(**CONFIGS["mamba2"])
    model = perturbed_model(cfg)
    src, hf_dir, back = tmp_path / "mamba_ssm", tmp_path / "hf", tmp_path / "back"
    model.save_pretrained(src)

    res = run_cli(f"ckpt={src}", f"out={hf_dir}", "format=hf")
    assert res.returncode == 0, res.stderr
    assert str(hf_dir.resolve()) in res.stdout
    assert json.loads((hf_dir / "config.json").read_text())["model_type"] == "mamba2"

    res = run_cli(f"ckpt={hf_dir}", f"out={back}", "format=mamba_ssm")
    assert res.returncode == 0, res.stderr
    assert str(back.resolve()) in res.stdout
    assert (back / "pytorch_model.bin").is_file()  # what mamba_ssm's from_pretrained reads
    assert json.loads((back / "config.json").read_text()) == json.loads(
        (src / "config.json").read_text())
    loaded = load_model(back, backend="reference")
    for key, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key


@pytest.mark.parametrize("args,needle", [
    ((), "missing required argument"),
    (("ckpt=x", "out=y"), "format="),
    (("ckpt=x", "out=y", "format=onnx"), "format must be one of hf|mamba_ssm"),
    (("ckpt=x", "out=y", "format=hf", "dtype=int8"), "dtype must be one of"),
    (("ckpt=x", "out=y", "format=hf", "shards=3"), "unknown argument 'shards'"),
    (("ckpt", "out=y", "format=hf"), "not key=value"),
])
def test_cli_usage_errors(args, needle):
    res = run_cli(*args)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], res.stderr


@pytest.mark.parametrize("fmt", ["hf", "mamba_ssm"])
def test_cli_refuses_an_out_that_holds_a_model(fmt, tmp_path, capsys):
    """format=mamba_ssm overwrote another model's config.json and weights in place."""
    from mamba_train.cli.export import main

    other = tmp_path / "other"
    build_model(MambaLMConfig(**CONFIGS["mamba1"]), backend="reference").save_pretrained(other)
    before = {p.name: p.read_bytes() for p in other.iterdir()}
    assert main([f"ckpt={other}", f"out={other}", f"format={fmt}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"out={other} already holds a model (config.json" in err, err
    assert {p.name: p.read_bytes() for p in other.iterdir()} == before


@pytest.mark.parametrize("fmt", ["hf", "mamba_ssm"])
def test_cli_conversion_error_is_one_line(fmt, tmp_path, capsys):
    # in-process (the subprocess path is covered above; this one would pay the imports again)
    from mamba_train.cli.export import main

    assert main([f"ckpt={tmp_path / 'missing'}", f"out={tmp_path / 'o'}", f"format={fmt}"]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "does not exist" in lines[0], lines
    # a hybrid cannot become a transformers model: the ExportError names the field
    src = tmp_path / "hybrid"
    build_model(MambaLMConfig(**CONFIGS["mamba1"], d_intermediate=64),
                backend="reference").save_pretrained(src)
    rc = main([f"ckpt={src}", f"out={tmp_path / 'o'}", f"format={fmt}"])
    out, err = capsys.readouterr()
    if fmt == "hf":
        assert rc == 1 and len(err.strip().splitlines()) == 1 and "d_intermediate" in err, err
        assert not (tmp_path / "o" / "config.json").exists()
    else:
        assert rc == 0 and (tmp_path / "o" / "pytorch_model.bin").is_file(), err


# ------------------------------------------------------------------------------ trained run -> HF
@pytest.fixture(scope="module")
def trained_ckpt(tmp_path_factory):
    """The debug recipe (tiny sizes) trained a few steps on CPU; its run config names the
    bundled tokenizer."""
    from conftest import TINY, compose_config
    from mamba_train.train import train

    out = tmp_path_factory.mktemp("trained")
    result = train(compose_config([*TINY, "recipe=debug", "logger=csv", "trainer.max_steps=3",
                                   "train.checkpoint_every_n_steps=3", "trainer.limit_val_batches=0"],
                                  out))
    return Path(result["last_checkpoint"])


@pytest.mark.parametrize("tokenizer_arg", [(), ("tokenizer=default",)], ids=["implied", "default"])
def test_exported_training_checkpoint_generates_with_its_own_tokenizer(trained_ckpt, tokenizer_arg,
                                                                     tmp_path, capsys):
    """No tokenizer argument needed: the export carries the training tokenizer and its special
    ids, so AutoTokenizer + AutoModelForCausalLM + generate() work on the directory as it is."""
    from mamba_train.data.tokenizer import load_tokenizer
    from mamba_train.cli.export import main

    out = tmp_path / "hf"
    assert main([f"ckpt={trained_ckpt}", f"out={out}", "format=hf", *tokenizer_arg]) == 0, \
        capsys.readouterr().err
    tok = transformers.AutoTokenizer.from_pretrained(out)
    trained_with = load_tokenizer("default")
    assert len(tok) == len(trained_with) == 4096
    raw = json.loads((out / "config.json").read_text())
    assert raw["eos_token_id"] == tok.eos_token_id == trained_with.eos_token_id
    text = "The primary must evaluate to"
    assert tok(text)["input_ids"] == trained_with.encode(text)
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = tok(text, return_tensors="pt")["input_ids"]
    gen = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert gen.shape[0] == 1 and ids.shape[1] < gen.shape[1] <= ids.shape[1] + 5
    assert torch.equal(gen[0, :ids.shape[1]], ids[0])
    ours = load_model(trained_ckpt, backend="reference").eval()
    with torch.no_grad():  # the exported model's first generated token is ours
        assert gen[0, ids.shape[1]] == ours(ids).logits[0, -1, :len(tok)].argmax()


def test_mamba_ssm_export_carries_the_training_tokenizer(trained_ckpt, tmp_path, capsys):
    from mamba_train.cli.export import main

    out = tmp_path / "ssm"
    assert main([f"ckpt={trained_ckpt}", f"out={out}", "format=mamba_ssm"]) == 0
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert len(tok) == 4096 and tok.eos_token == "<|endoftext|>"


def test_a_transformers_family_is_one_registry_entry(monkeypatch):
    """Export takes the first registered family that claims and can represent a config; a
    config no claimant can hold gets every claimant's reason; reading dispatches on model_type."""
    import dataclasses

    from mamba_train.formats import hf
    from mamba_train.formats.hf_mamba import MAMBA2

    # LayerNorm: neither Mamba2ForCausalLM (no MLP) nor a hybrid family (RMSNorm only) holds it
    cfg = MambaLMConfig(**{**CONFIGS["mamba2"], "d_intermediate": 128, "rms_norm": False})
    with pytest.raises(ExportError, match="d_intermediate"):
        hf.family_for(cfg)
    fields = {"hidden_size": cfg.d_model}
    with_mlp = dataclasses.replace(MAMBA2, model_type="mamba2_mlp",
                                   claims=lambda c: c.layer == "Mamba2" and c.d_intermediate > 0,
                                   config_fields=lambda c: fields)
    monkeypatch.setitem(hf.FAMILIES, "mamba2_mlp", with_mlp)
    assert hf.family_for(cfg) == (with_mlp, fields)
    assert hf.family_for(MambaLMConfig(**CONFIGS["mamba2"]))[0] is MAMBA2

    def refuse(c):
        raise ExportError("model.d_intermediate: not this one either")

    monkeypatch.setitem(hf.FAMILIES, "mamba2_mlp", dataclasses.replace(with_mlp, config_fields=refuse))
    with pytest.raises(ExportError, match=r"^mamba2: .*d_intermediate.*; mamba2_mlp: .*either"):
        hf.family_for(cfg)
    with pytest.raises(ExportError, match="model_type='zamba2'"):
        hf.config_from_hf({"model_type": "zamba2"})
