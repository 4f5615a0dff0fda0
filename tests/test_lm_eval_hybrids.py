"""lm-eval on hybrid and mixture-of-experts checkpoints trained here: the adapter's log-likelihood
is the model's own next-token log-probabilities, and its greedy generation (mamba_train's
decoding, recurrent states and attention caches included) picks the tokens a whole-sequence
re-read picks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from lm_eval.api.instance import Instance

from test_init_from import RUN
from mamba_train.data.tokenizer import load_tokenizer
from mamba_train.evaluation.lm_eval_adapter import MambaTrainLM

# one in the default suite, the rest with -m slow (~15 s each on 2 cores)
RECIPES = ["debug-granite-moe", *(pytest.param(r, marks=pytest.mark.slow)
                                  for r in ("debug-nemotron-h", "debug-falcon-h1", "debug-jamba"))]


def _req(kind, *args):
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


@pytest.mark.parametrize("recipe", RECIPES)
def test_hybrid_checkpoint_scores_and_generates_through_lm_eval(recipe, make_config):
    from mamba_train.train import train

    run = [o for o in RUN if not o.startswith(("model=", "trainer.max_steps"))]
    result = train(make_config(f"recipe={recipe}", *run, "trainer.max_steps=3",
                               "train.checkpoint_every_n_steps=3", tiny=False))
    lm = MambaTrainLM(pretrained=str(result["last_checkpoint"]), batch_size=2, dtype="float32",
                      device="cpu")
    tok = load_tokenizer("default")
    context, continuation = "The primary must evaluate to", " an object of a type"
    (score, _), = lm.loglikelihood([_req("loglikelihood", context, continuation)])
    ids = tok.encode(context + continuation)
    n_ctx = len(tok.encode(context))
    with torch.no_grad():
        logits = lm.model(torch.tensor([ids])).logits[0, :, :len(tok)].float()
    want = F.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(ids[1:])[:, None])[n_ctx - 1:]
    assert score == pytest.approx(want.sum().item(), abs=1e-4)

    steps = 8
    out, = lm.generate_until([_req("generate_until", context, {"until": [], "max_gen_toks": steps})])
    seq = tok.encode(context)
    for _ in range(steps):
        with torch.no_grad():
            nxt = lm.model(torch.tensor([seq])).logits[0, -1, :len(tok)].argmax().item()
        seq.append(nxt)
        if nxt == tok.eos_token_id:
            break
    gen = seq[n_ctx:]
    assert out == tok.decode(gen, skip_special_tokens=False).split(tok.eos_token)[0]
