"""The lm-eval adapter on the fused backend (mamba_ssm kernels) vs the reference backend (pure
PyTorch), same weights: the log-likelihoods of the same requests agree -- in fp32 to kernel
precision and under bf16 autocast to bf16 precision -- including right-padded batches (the
adapter pads on the right and gathers each row at its own length) and the rolling windows of
perplexity tasks. GPU only (tests/gpu/run_all.sh, which sets TRITON_F32_DEFAULT=ieee)."""

import json

import pytest
import torch
from lm_eval.api.instance import Instance

from mamba_train import MambaLMConfig, build_model
from mamba_train.evaluation.lm_eval_adapter import MambaTrainLM
from mamba_train.evaluation.runner import TASKS_DIR

CONFIGS = {
    "mamba1": dict(d_model=256, n_layer=2, vocab_size=4096, ssm_cfg={"layer": "Mamba1"}),
    "mamba2": dict(d_model=256, n_layer=2, vocab_size=4096,
                   ssm_cfg={"layer": "Mamba2", "d_state": 64, "headdim": 32, "chunk_size": 64}),
}
# |fused - reference| <= rel * |reference| + abs, per request (a sum of log-probs)
TOL = {"float32": (1e-4, 1e-3), "bfloat16": (2e-2, 0.1)}


def _rows(name):
    with open(TASKS_DIR / "data" / f"{name}.jsonl") as f:
        return [json.loads(line) for line in f]


def _req(kind, *args):
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def requests():
    ll = [_req("loglikelihood", r["context"], " " + c) for r in _rows("mc")[:16] for c in r["choices"]]
    ll += [_req("loglikelihood", " ".join(r["text"].split(" ")[:-1]), " " + r["text"].split(" ")[-1])
           for r in _rows("lambada")]
    ll.append(_req("loglikelihood", "", "The primary must evaluate"))  # empty context
    rolling = [_req("loglikelihood_rolling", r["text"]) for r in _rows("ppl")]
    return ll, rolling


@pytest.fixture(scope="module", params=list(CONFIGS))
def weights(request, tmp_path_factory):
    torch.manual_seed(0)
    model = build_model(MambaLMConfig(**CONFIGS[request.param]), backend="reference", device="cpu")
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return request.param, path


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_adapter_scores_agree_fused_vs_reference(weights, dtype, record):
    name, path = weights
    kw = dict(pretrained=str(path), tokenizer="default", batch_size=8, dtype=dtype, device="cuda")
    fused = MambaTrainLM(backend="fused", **kw)
    ref = MambaTrainLM(backend="reference", **kw)
    assert fused.model.backend == "fused" and ref.model.backend == "reference"
    ll, rolling = requests()
    lf, lr = fused.loglikelihood(ll), ref.loglikelihood(ll)
    # 32-token windows: every paragraph (26-88 tokens) spans one to three rolling windows
    fused_w = MambaTrainLM(backend="fused", max_length=32, **kw)
    ref_w = MambaTrainLM(backend="reference", max_length=32, **kw)
    rf, rr = fused_w.loglikelihood_rolling(rolling), ref_w.loglikelihood_rolling(rolling)

    rel, abs_ = TOL[dtype]
    errs = [abs(a - b) for (a, _), (b, _) in zip(lf, lr)] + [abs(a - b) for a, b in zip(rf, rr)]
    refs = [abs(b) for b, _ in lr] + [abs(b) for b in rr]
    worst = max(range(len(errs)), key=lambda i: errs[i] - rel * refs[i])
    greedy_agree = sum(a[1] == b[1] for a, b in zip(lf, lr)) / len(lf)
    record(f"lm-eval adapter parity {name} {dtype}: {len(errs)} requests, max |fused-ref| "
           f"{max(errs):.3e} (worst {errs[worst]:.3e} of {refs[worst]:.1f}), is_greedy agreement "
           f"{greedy_agree:.3f} (tol rel {rel:g} + abs {abs_:g})")
    for e, r in zip(errs, refs):
        assert e <= rel * r + abs_, (e, r)
    if dtype == "float32":
        assert greedy_agree == 1.0


def test_adapter_fp32_equals_direct_fused_computation(weights, record):
    """The adapter's batched, right-padded scoring == model(input_ids).logits one at a time."""
    _, path = weights
    lm = MambaTrainLM(pretrained=str(path), tokenizer="default", batch_size=8, dtype="float32",
                      device="cuda", backend="fused")
    ll, _ = requests()
    scores = lm.loglikelihood(ll)
    worst = 0.0
    for req, (score, _) in zip(ll, scores):
        ctx, cont = req.args
        if ctx:
            whole, c = lm.tok_encode(ctx + cont), lm.tok_encode(ctx)
            ids, n = c + whole[len(c):], len(whole) - len(c)
        else:
            ids, n = [lm.eot_token_id] + lm.tok_encode(cont), len(lm.tok_encode(cont))
        with torch.no_grad():
            logits = lm.model(torch.tensor([ids], device="cuda")).logits[0].float()
        lp = torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(ids[1:], device="cuda")[:, None])
        worst = max(worst, abs(score - lp[-n:].sum().item()))
    record(f"lm-eval adapter fused fp32 batched vs direct: max |diff| {worst:.3e}")
    assert worst < 1e-3
