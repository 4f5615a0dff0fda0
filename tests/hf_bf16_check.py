"""Our model against transformers' under bf16 autocast, judged against an fp32 reference.

Under bf16 autocast the two sides round in different places: transformers' causal-LM heads make
bf16 logits and upcast them for the loss (so d(logits) reaches the head's matmul in bf16), while
our loss (models/loss.py) computes the logits and their gradient chunk by chunk in fp32. Neither
is the exact gradient; comparing them with each other measures two legitimate roundings at once.
So both are compared with the fp32 run (transformers' model, no autocast; ours agrees with it to
~1e-6 in fp32, tests/test_hf_hybrids.py) and ours may be no further from it than transformers'
own bf16 run is, times ``factor``, plus ``floor`` (of the reference's norm): rounding of another
order passes, a wrong term or scale (errors of order one) does not.
"""

from __future__ import annotations

import torch

from mamba_train.formats.hf import FAMILIES


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12)).item()


def _run(model, ids, labels, device, bf16, vocab, **kw):
    """Logits (first ``vocab`` columns, fp32) and parameter gradients of one training step."""
    model.zero_grad(set_to_none=True)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
        out = model(ids, labels=labels, **kw)
        logits = out.logits
        if logits is None:  # our loss never materialises them: a forward without labels
            with torch.no_grad():
                logits = model(ids, **kw).logits
    out.loss.backward()
    return logits[..., :vocab].detach().float(), {
        n: p.grad.detach().float().cpu() for n, p in model.named_parameters() if p.grad is not None}


def bf16_errors(hf, ours, ids, model_type: str, device: str) -> dict[str, tuple[float, ...]]:
    """``{name: (ours' bf16 error, transformers' bf16 error, ours' fp32 error)}`` against
    transformers' fp32 step, for the logits and every gradient (transformers' names)."""
    vocab = hf.config.vocab_size
    labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)
    family = FAMILIES[model_type]

    def hf_step(bf16):  # transformers shifts its labels itself
        return _run(hf, ids, ids, device, bf16, vocab, use_cache=False)

    def ours_step(bf16):
        logits, grads = _run(ours, ids, labels, device, bf16, vocab)
        return logits, {k: v.float() for k, v in family.to_hf(ours.config, grads).items()}
    ref_logits, ref = hf_step(False)
    hf_logits, hf_bf16 = hf_step(True)
    our_logits, our_bf16 = ours_step(True)
    our_logits32, our_fp32 = ours_step(False)
    errs = {"logits": (rel_err(our_logits, ref_logits), rel_err(hf_logits, ref_logits),
                       rel_err(our_logits32, ref_logits))}
    for name, g in ref.items():
        assert name in our_bf16, f"no gradient of ours maps to transformers' {name}"
        errs[name] = (rel_err(our_bf16[name], g), rel_err(hf_bf16[name], g),
                      rel_err(our_fp32[name], g))
    return errs


def assert_no_further_from_fp32(errs: dict[str, tuple[float, ...]], factor: float = 1.5,
                                floor: float = 2e-2) -> tuple[float, str]:
    """Every entry: ours' bf16 error <= factor * transformers' bf16 error + floor. The floor is
    for the per-head vectors (D, A_log, dt_bias): sums over every token with much cancellation,
    where either side's bf16 error alone reaches a few percent on CPU. Returns the worst
    (ratio to the bound, name) for the record."""
    bad = {n: e for n, e in errs.items() if e[0] > factor * e[1] + floor}
    assert not bad, "further from the fp32 reference than transformers' bf16 run (ours, theirs): " + \
        ", ".join(f"{n} {e[0]:.2e} vs {e[1]:.2e}" for n, e in bad.items())
    return max((e[0] / (factor * e[1] + floor), n) for n, e in errs.items())


def token_ids(hf, batch: int, seqlen: int, device: str, seed: int = 0) -> torch.Tensor:
    """Random ids without the pad token: transformers' Bamba and Falcon-H1 embeddings are built
    with ``padding_idx=pad_token_id`` (that row never gets a gradient); ours train every row, a
    difference of semantics, not of rounding, which these comparisons are not about."""
    vocab, pad = hf.config.vocab_size, hf.config.pad_token_id
    gen = torch.Generator(device).manual_seed(seed)
    ids = torch.randint(0, vocab - 1, (batch, seqlen), device=device, generator=gen)
    return ids if pad is None else ids + (ids >= pad).long()
