"""Continued pretraining (``init_from=<source>``): sources written by transformers itself and in
the mamba_ssm layout arrive bit for bit, the first training loss is the one transformers
computes, and every bad source is refused with one line. Multi-process strategies:
test_init_from_distributed.py."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from conftest import compose_config  # noqa: E402
from mamba_train import MambaLMConfig, build_model  # noqa: E402
from mamba_train.formats.checkpoint import CKPT_CONFIG_KEY  # noqa: E402
from mamba_train.formats.hf_mamba import MAMBA  # noqa: E402
from mamba_train.train import train  # noqa: E402
from mamba_train.training.run.init_from import (InitFromError, LoadedWeights, fingerprint,  # noqa: E402
                                            resolve_source)

hf_key = MAMBA.hf_key  # Mamba and Mamba-2 rename the same prefix

VOCAB, EOS = 4096, 0  # the bundled tokenizer of the default data
# model=source: everything about the model from init_from; the rest of conftest's TINY
RUN = ["model=source", "data.seq_len=64", "data.micro_batch_size=4", "train.global_batch_tokens=256",
       "data.num_workers=0", "trainer.log_every_n_steps=1", "callbacks.progress_bar=null",
       "trainer.enable_model_summary=false", "logger=csv", "trainer.max_steps=1",
       "trainer.limit_val_batches=0", "trainer.accelerator=cpu", "trainer.precision=32-true"]


def hf_model(layer: str, vocab: int = VOCAB, seed: int = 0):
    """A transformers model whose tensors all differ from any init (trained-looking)."""
    torch.manual_seed(seed)
    if layer == "mamba":
        cfg = transformers.MambaConfig(hidden_size=64, num_hidden_layers=2, vocab_size=vocab,
                                       state_size=8, eos_token_id=EOS)
        model = transformers.MambaForCausalLM(cfg)
    else:
        cfg = transformers.Mamba2Config(hidden_size=64, num_hidden_layers=2, vocab_size=vocab,
                                        num_heads=8, head_dim=16, n_groups=2, state_size=16,
                                        chunk_size=16, eos_token_id=EOS)
        model = transformers.Mamba2ForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def save_hf(model, out: Path, sharded: bool = False) -> Path:
    model.save_pretrained(out, max_shard_size="100KB" if sharded else "5GB")
    assert (out / "model.safetensors.index.json").is_file() == sharded
    return out


def hf_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class Capture(L.Callback):
    """The model's full state after setup, the first batch and its training loss."""

    def on_fit_start(self, trainer, pl_module):
        self.state = {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            self.batch = {k: v.clone() for k, v in batch.items()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == 0:
            self.loss = float(outputs["loss"])


def run(tmp_path: Path, *overrides: str, callbacks=()):
    return train(compose_config([*RUN, *overrides], tmp_path / "out"), extra_callbacks=list(callbacks))


@pytest.mark.parametrize("layer,sharded", [("mamba", False), ("mamba2", True)],
                         ids=["MambaForCausalLM", "Mamba2ForCausalLM-sharded"])
def test_transformers_source_arrives_bit_identical_and_first_loss_matches(layer, sharded, tmp_path):
    model = hf_model(layer)
    src = save_hf(model, tmp_path / "src", sharded)
    cap = Capture()
    result = run(tmp_path, f"init_from={src}", "optim.lr=1e-3", callbacks=[cap])
    want = hf_state(model)
    assert set(hf_key(k) for k in cap.state) - {"lm_head.weight"} <= set(want)
    for key, tensor in cap.state.items():
        assert torch.equal(tensor, want[hf_key(key)]), key
    # the first loss is transformers' own on the same batch (fp32, its PyTorch path)
    with torch.no_grad():
        logits = model(cap.batch["input_ids"]).logits.float()
    ref = F.cross_entropy(logits.flatten(0, 1), cap.batch["labels"].flatten(), ignore_index=-100)
    assert cap.loss == pytest.approx(float(ref), rel=1e-5, abs=1e-5)
    assert result["module"].loaded_weights is not None
    assert result["trainer"].global_step == 1


def test_mamba_ssm_source_and_ckpt_source(tmp_path):
    """The mamba_ssm layout (config.json + pytorch_model.bin) and a mamba_train .ckpt: weights
    only -- the checkpoint's step counter and optimizer state are not carried over."""
    cfg = MambaLMConfig(d_model=64, n_layer=2, vocab_size=VOCAB, ssm_cfg={"d_state": 8})
    torch.manual_seed(3)
    model = build_model(cfg, backend="reference")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    want = hf_state(model)
    model.save_pretrained(tmp_path / "ssm")
    ckpt = tmp_path / "src.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in want.items()}, "global_step": 500,
                "optimizer_states": [{"state": {}}], CKPT_CONFIG_KEY: cfg.to_dict()}, ckpt)
    for i, source in enumerate([tmp_path / "ssm", ckpt]):
        cap = Capture()
        result = run(tmp_path, f"init_from={source}", f"run_name=r{i}", callbacks=[cap])
        for key, tensor in want.items():
            assert torch.equal(cap.state[key], tensor), (source, key)
        assert result["trainer"].global_step == 1  # fresh counter


def test_agreeing_model_group_is_accepted_and_contradicting_keys_listed(tmp_path):
    src = save_hf(hf_model("mamba"), tmp_path / "src")
    agreeing = ["model=debug", "model.d_model=64", "model.n_layer=2", "model.ssm_cfg.d_state=8",
                # init-only knobs and the kernel choice may differ
                "+model.ssm_cfg.dt_max=0.2", "+model.fused_add_norm=false"]
    result = run(tmp_path, f"init_from={src}", *agreeing)
    assert result["module"].model_config.fused_add_norm is False
    with pytest.raises(InitFromError) as err:
        run(tmp_path, f"init_from={src}", "run_name=b", "model=debug")  # 256 x 4, d_state 16
    msg = str(err.value)
    assert "\n" not in msg
    for field in ("d_model=256 (source: 64)", "n_layer=4 (source: 2)", "ssm_cfg.d_state=16 (source: 8)"):
        assert field in msg, msg
    assert "vocab" not in msg and "dt_max" not in msg


def test_wrong_vocab_is_refused_or_resized(tmp_path):
    model = hf_model("mamba", vocab=512)
    src = save_hf(model, tmp_path / "src")
    with pytest.raises(InitFromError, match=r"vocab_size=4096, the source's embedding has 512 rows"
                                            r".*init_from_resize_vocab=true") as err:
        run(tmp_path, f"init_from={src}")
    assert "\n" not in str(err.value)
    cap = Capture()
    run(tmp_path, f"init_from={src}", "init_from_resize_vocab=true", "run_name=resized",
        callbacks=[cap])
    emb, old = cap.state["backbone.embedding.weight"], hf_state(model)["backbone.embeddings.weight"]
    assert emb.shape == (VOCAB, 64)
    assert torch.equal(emb[:512], old)
    assert torch.allclose(emb[512:], old.double().mean(0).float().expand(VOCAB - 512, 64))


def test_eos_mismatch_is_refused(tmp_path):
    model = hf_model("mamba")
    model.config.eos_token_id = 7
    src = save_hf(model, tmp_path / "src")
    with pytest.raises(InitFromError, match="eos_id=0, the source's config.json says eos_token_id=7"):
        run(tmp_path, f"init_from={src}")


def test_bad_sources_give_one_line(tmp_path):
    src = save_hf(hf_model("mamba"), tmp_path / "src", sharded=True)
    missing = tmp_path / "missing"
    missing.mkdir()
    (missing / "config.json").write_text((src / "config.json").read_text())
    shard = sorted(src.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    bin_src = tmp_path / "ssm"  # the mamba_ssm layout, its pytorch_model.bin cut short
    build_model(MambaLMConfig(d_model=32, n_layer=1, vocab_size=VOCAB), backend="reference"
                ).save_pretrained(bin_src)
    weights = bin_src / "pytorch_model.bin"
    weights.write_bytes(weights.read_bytes()[:1000])
    cases = {tmp_path / "nowhere": "does not exist",
             missing: "none of model.safetensors",
             src: "truncated or corrupt",
             bin_src: "truncated or corrupt"}
    for source, expected in cases.items():
        with pytest.raises(InitFromError) as err:
            run(tmp_path, f"init_from={source}")
        assert expected in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_cli_reports_a_bad_source_in_one_line(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "mamba_train", *RUN, f"init_from={tmp_path}/x",
                           f"paths.output_dir={tmp_path}"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: init_from={tmp_path}/x does not exist (expected a mamba_ssm or transformers "
        "directory, a .ckpt file or a hub id org/name)")


def test_hub_id_from_the_local_cache_only_when_offline(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(InitFromError, match="not in the local Hugging Face cache .* offline"):
        resolve_source("state-spaces/mamba-130m", cache_dir=tmp_path)
    # the cache layout huggingface_hub writes: refs/main -> snapshots/<commit>/
    repo = tmp_path / "models--state-spaces--mamba-130m"
    snap = repo / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    (snap / "config.json").write_text("{}")
    assert resolve_source("state-spaces/mamba-130m", cache_dir=tmp_path) == snap


def test_resume_wins_over_init_from(tmp_path):
    """A requeued job (same command, ckpt_path=last) continues its own run; the source's weights
    are not even read (here: deleted after the first run)."""
    src = save_hf(hf_model("mamba"), tmp_path / "src")
    common = [f"init_from={src}", "ckpt_path=last", "train.checkpoint_every_n_steps=1"]
    first = run(tmp_path, *common, "trainer.max_steps=2")
    assert first["module"].loaded_weights is not None and first["trainer"].global_step == 2
    (src / "model.safetensors").unlink()
    second = run(tmp_path, *common, "trainer.max_steps=3")
    assert second["module"].loaded_weights is None and second["trainer"].global_step == 3


def test_guard_detects_a_touched_weight():
    model = build_model(MambaLMConfig(d_model=32, n_layer=1, vocab_size=64), backend="reference")
    loaded = LoadedWeights("src", {n: fingerprint(p) for n, p in model.named_parameters()})
    assert loaded.verify(model) == len(list(model.parameters()))
    with torch.no_grad():
        bias = model.backbone.layers[0].mixer.dt_proj.bias
        bias[0] = torch.nextafter(bias[0], torch.tensor(0.0))  # one ulp
    with pytest.raises(InitFromError, match=r"dt_proj.bias'\] no longer equal init_from=src"):
        loaded.verify(model)


def test_model_source_needs_init_from(tmp_path):
    with pytest.raises(InitFromError, match="model=source"):
        run(tmp_path)


def test_fingerprint_is_exact():
    t = torch.randn(5, 3)
    u = t.clone()
    assert fingerprint(t) == fingerprint(u)
    u[2, 1] = torch.nextafter(u[2, 1], torch.tensor(float("inf")))
    assert fingerprint(t) != fingerprint(u)
    assert fingerprint(t) != fingerprint(t.double())
    assert json.dumps(fingerprint(torch.tensor(1.0)))  # 0-d tensors too


# config.json of the released checkpoints (hub: state-spaces/mamba-130m, state-spaces/mamba2-130m)
RELEASED = {
    "mamba-130m": {"d_model": 768, "n_layer": 24, "vocab_size": 50277, "ssm_cfg": {},
                   "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True,
                   "pad_vocab_size_multiple": 8},
    "mamba2-130m": {"d_model": 768, "d_intermediate": 0, "n_layer": 24, "vocab_size": 50277,
                    "ssm_cfg": {"layer": "Mamba2"}, "attn_layer_idx": [], "attn_cfg": {},
                    "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True,
                    "pad_vocab_size_multiple": 16, "tie_embeddings": True},
}


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_recipe_agrees_with_the_released_checkpoint(name, tmp_path):
    """``recipe=<name> init_from=state-spaces/<name>`` passes the architecture check, and the
    recipe's data (GPT-NeoX tokenizer: 50277 tokens) fits the embedding exactly."""
    from hydra.utils import instantiate

    from mamba_train.training.run.init_from import InitFrom, architecture_differences

    recipe = instantiate(compose_config([f"recipe={name}"], tmp_path).model, _convert_="all")
    released = MambaLMConfig.from_dict(RELEASED[name])
    assert architecture_differences(recipe, released) == []
    other = "mamba2-130m" if name == "mamba-130m" else "mamba-130m"
    assert architecture_differences(recipe, MambaLMConfig.from_dict(RELEASED[other]))[0].startswith(
        "ssm_cfg.layer=")
    plan = InitFrom(name, tmp_path, released)
    assert plan.fit_vocabulary(50277, 0).padded_vocab_size == released.padded_vocab_size
    with pytest.raises(InitFromError, match="vocab_size=50280"):
        plan.fit_vocabulary(50280, 0)  # an exact source: padding to the same rows is not enough


def test_resize_vocab_grows_and_cuts_an_untied_head():
    from mamba_train.training.run.init_from import resize_vocab

    cfg = MambaLMConfig(d_model=8, n_layer=1, vocab_size=10, tie_embeddings=False)  # 16 rows
    state = {"backbone.embedding.weight": torch.randn(16, 8), "lm_head.weight": torch.randn(16, 8),
             "backbone.norm_f.weight": torch.ones(8)}
    grown = resize_vocab(state, cfg, 20)  # 24 rows
    for key in ("backbone.embedding.weight", "lm_head.weight"):
        assert grown[key].shape == (24, 8)
        assert torch.equal(grown[key][:10], state[key][:10])
        # new tokens and padding (the source's 6 padding rows too): the mean of the 10 token rows
        assert torch.allclose(grown[key][10:], state[key][:10].mean(0).expand(14, 8))
    cut = resize_vocab(state, cfg, 5)  # 8 rows
    assert torch.equal(cut["lm_head.weight"], state["lm_head.weight"][:8])
    assert cut["backbone.norm_f.weight"] is state["backbone.norm_f.weight"]
