"""A hybrid trained here leaves the framework and generates: each hybrid debug recipe trains a
few steps through the trainer, ``python -m mamba_train.export format=hf`` writes its family with
the training tokenizer, and transformers' ``generate`` (greedy, with its own recurrent and KV
caches) produces the tokens our model picks by re-reading the whole sequence each step."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_hf_hybrids_training import DEBUG  # noqa: E402
from test_init_from import RUN  # noqa: E402

from mamba_train.formats.load import load_model  # noqa: E402

RECIPES = {**DEBUG, "debug-nemotron-moe": "NemotronHForCausalLM",
           "debug-granite-moe": "GraniteMoeHybridForCausalLM"}
NEW_TOKENS = 12


def _greedy(model, ids, vocab, steps):
    for _ in range(steps):
        with torch.no_grad():
            nxt = model(ids).logits[:, -1, :vocab].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    return ids


@pytest.mark.parametrize("recipe", [r if r in ("debug-falcon-h1", "debug-nemotron-moe") else
                                    pytest.param(r, marks=pytest.mark.slow) for r in sorted(RECIPES)])
def test_trained_hybrid_exports_and_generates_in_transformers(recipe, make_config, tmp_path, capsys):
    from mamba_train.cli.export import main
    from mamba_train.train import train

    run = [o for o in RUN if not o.startswith(("model=", "trainer.max_steps"))]
    result = train(make_config(f"recipe={recipe}", *run, "trainer.max_steps=3",
                               "train.checkpoint_every_n_steps=3", tiny=False))
    ckpt = result["last_checkpoint"]
    out = tmp_path / "hf"
    assert main([f"ckpt={ckpt}", f"out={out}", "format=hf"]) == 0, capsys.readouterr().err
    tok = transformers.AutoTokenizer.from_pretrained(out)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(hf).__name__ == RECIPES[recipe]
    ids = tok("The primary must evaluate to", return_tensors="pt")["input_ids"]
    gen = hf.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    ours = load_model(ckpt, backend="reference", device="cpu").eval()
    want = _greedy(ours, ids, hf.config.vocab_size, NEW_TOKENS)
    assert gen.tolist() == want.tolist(), tok.batch_decode([gen[0], want[0]])
