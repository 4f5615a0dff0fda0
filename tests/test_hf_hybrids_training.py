"""Continued pretraining from transformers' hybrid families: ``init_from=<dir> model=source``
trains two steps at a negligible learning rate, its first loss is transformers' own on the same batch, and
``python -m mamba_train.export format=hf`` of the run's checkpoint returns the source's tensors."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from test_hf_hybrids import bamba, falcon_h1, make_hf, nemotron_h  # noqa: E402
from test_init_from import RUN, Capture, run  # noqa: E402

VOCAB, EOS = 4096, 0  # the bundled tokenizer of the default data
SOURCES = {
    "nemotron_h": nemotron_h("M-*-M-", False, vocab_size=VOCAB, eos_token_id=EOS),
    "bamba": bamba([1], True, vocab_size=VOCAB, eos_token_id=EOS),
    "falcon_h1": falcon_h1(False, vocab_size=VOCAB, eos_token_id=EOS),
}


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(SOURCES))
def test_init_from_trains_and_exports_the_source_tensors(family, tmp_path):
    hf, src = make_hf(tmp_path, SOURCES[family])
    cap = Capture()
    result = run(tmp_path, f"init_from={src}", "optim.lr=1e-12", "trainer.max_steps=2",
                 callbacks=[cap])
    assert result["trainer"].global_step == 2
    with torch.no_grad():
        logits = hf(cap.batch["input_ids"]).logits.float()
    ref = F.cross_entropy(logits.flatten(0, 1), cap.batch["labels"].flatten(), ignore_index=-100)
    assert cap.loss == pytest.approx(float(ref), rel=1e-5, abs=1e-5)
    ckpts = sorted((tmp_path / "out").rglob("*.ckpt"))
    assert ckpts, "the run wrote no checkpoint"
    out = tmp_path / "exported"
    proc = subprocess.run([sys.executable, "-m", "mamba_train.export", f"ckpt={ckpts[-1]}",
                           f"out={out}", "format=hf"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    from safetensors.torch import load_file
    got = load_file(out / "model.safetensors")
    tied = hf.lm_head.weight is hf.get_input_embeddings().weight
    want = {k: v for k, v in hf.state_dict().items() if not (tied and k == "lm_head.weight")}
    assert sorted(got) == sorted(want)
    for key, tensor in want.items():  # two AdamW steps of 1e-12: below fp32 resolution but at 0
        torch.testing.assert_close(got[key], tensor, rtol=0, atol=1e-10, msg=key)


DEBUG = {"debug-nemotron-h": "NemotronHForCausalLM", "debug-bamba": "BambaForCausalLM",
         "debug-falcon-h1": "FalconH1ForCausalLM", "debug-jamba": "JambaForCausalLM"}


@pytest.mark.parametrize("recipe", sorted(DEBUG))
def test_debug_recipe_exports_to_its_family_with_our_logits(recipe, make_config, tmp_path):
    from hydra.utils import instantiate

    from mamba_train.formats.hf_export import export_hf
    from mamba_train.models.build import build_model

    cfg = instantiate(make_config(f"recipe={recipe}", tiny=False).model, _convert_="all")
    torch.manual_seed(0)
    model = build_model(cfg, backend="reference").eval()
    out = export_hf(model, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).float().eval()
    assert type(hf).__name__ == DEBUG[recipe]
    ids = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids).logits[..., :cfg.vocab_size],
                                   atol=1e-4, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", sorted(DEBUG))
def test_debug_recipe_trains(recipe, make_config):
    from mamba_train.train import train

    small = [o for o in RUN if not o.startswith(("model=", "trainer.max_steps"))]
    result = train(make_config(f"recipe={recipe}", *small, "trainer.max_steps=3", tiny=False))
    assert result["trainer"].global_step == 3
