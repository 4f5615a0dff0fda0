"""Jamba on the GPU: the fused Mamba-1 mixer with its dt/B/C norms (mamba_ssm's causal_conv1d_fn
and selective_scan_fn, models/fused.py) against the reference mixer in fp32 (logits and every
gradient), and our fused model under bf16 autocast no further from transformers' fp32 step than
transformers' own bf16 run is. GPU only (tests/gpu/run_all.sh); the CPU versions are
tests/test_hf_jamba.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).parents[1]))

from hf_bf16_check import assert_no_further_from_fp32, bf16_errors, rel_err, token_ids  # noqa: E402
from test_hf_jamba import CASES  # noqa: E402
from test_hf_hybrids import make_hf  # noqa: E402

from mamba_train.formats.load import load_model  # noqa: E402

GPU_CASES = ["ME*-ME*--untied", "M-M-*EM-M--tied-biases"]


def _step(model, ids):
    model.zero_grad(set_to_none=True)
    labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)
    model(ids, labels=labels).loss.backward()
    with torch.no_grad():
        logits = model(ids).logits.float()
    return logits, {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("case", GPU_CASES)
def test_fused_mixer_with_dt_bc_norms_equals_the_reference_in_fp32(case, tmp_path, record):
    _, src = make_hf(tmp_path, CASES[case][0])
    ids = torch.randint(0, 96, (2, 512), device="cuda",
                        generator=torch.Generator("cuda").manual_seed(0))
    out = {b: _step(load_model(src, backend=b, device="cuda").train(), ids)
           for b in ("reference", "fused")}
    (lr, gr), (lf, gf) = out["reference"], out["fused"]
    assert sorted(gr) == sorted(gf)
    dl = rel_err(lf, lr)
    worst = max((rel_err(gf[n], gr[n]), n) for n in gr)
    norms = {n: rel_err(gf[n], gr[n]) for n in gr if n.endswith(("dt_norm.weight", "B_norm.weight",
                                                                 "C_norm.weight"))}
    record(f"jamba fused vs reference {case} fp32 2x512: logits {dl:.2e}, worst grad {worst[1]} "
           f"{worst[0]:.2e}, dt/B/C norm grads up to {max(norms.values()):.2e}")
    assert norms, "no dt/B/C norm gradients"
    assert dl < 1e-4 and worst[0] < 1e-3


@pytest.mark.parametrize("case", GPU_CASES)
def test_fused_under_bf16_autocast_no_further_from_fp32_than_transformers(case, tmp_path, record):
    spec = {**CASES[case][0], "router_aux_loss_coef": 0.0}  # transformers' loss has no aux term
    hf, src = make_hf(tmp_path, spec)
    hf = hf.cuda().train()
    ours = load_model(src, backend="fused", device="cuda").train()
    ids = token_ids(hf, 2, 256, "cuda")
    errs = bf16_errors(hf, ours, ids, "jamba", "cuda")
    worst = max((e[0], n) for n, e in errs.items())
    ratio, at = assert_no_further_from_fp32(errs)
    record(f"jamba fused vs transformers {case} under bf16 autocast, against transformers' fp32: "
           f"logits {errs['logits'][0]:.2e} (transformers {errs['logits'][1]:.2e}), worst grad "
           f"{worst[1]} {worst[0]:.2e}; tightest {at} at {ratio:.2f} of its bound")
