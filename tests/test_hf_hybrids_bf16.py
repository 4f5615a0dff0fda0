"""The bf16-autocast comparison the GPU test makes (tests/hf_bf16_check.py), on CPU with the
reference backend: ours agrees with transformers in fp32, stays within transformers' own bf16
distance of the fp32 step, and a wrong gradient scale is caught."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hf_bf16_check import assert_no_further_from_fp32, bf16_errors, token_ids  # noqa: E402
from test_hf_hybrids import CASES, make_hf  # noqa: E402

from mamba_train.formats.load import load_model  # noqa: E402


def _errors(tmp_path, case, plant=None):
    hf, src = make_hf(tmp_path, CASES[case])
    ours = load_model(src, backend="reference", device="cpu").train()
    if plant is not None:
        plant(ours)
    return bf16_errors(hf.train(), ours, token_ids(hf, 2, 64, "cpu"), CASES[case]["model_type"], "cpu")


SLOW_CASES = [pytest.param(c, marks=pytest.mark.slow) for c in sorted(CASES)
              if c not in ("bamba-attn02-tied", "falcon_h1-norm-before-gate")]
# D's gradient of this one layer (gated RMSNorm before the gate, 3 groups) is ~60% from the fp32
# step under CPU bf16 autocast in our reference backend (transformers' bf16 run: ~1%; ours in
# fp32: ~1e-5). Cause: an RMSNorm straight after y = scan + D·x is scale-invariant, so dD is a
# near-cancelling sum, and our reference runs the scan on bf16 x and returns y in bf16 before the
# norm (as mamba_ssm's kernels do) where transformers' torch path stays in fp32; with the scan's
# input and output in fp32 the gap falls to ~2e-2, inside the bound. Whether the reference
# backend should keep them in fp32 under autocast is open
KNOWN = pytest.param("falcon_h1-norm-before-gate", marks=[pytest.mark.slow, pytest.mark.xfail(
    strict=True, reason="reference backend: D's gradient under bf16 autocast, see comment")])


@pytest.mark.parametrize("case", ["bamba-attn02-tied", *SLOW_CASES, KNOWN])
def test_bf16_autocast_no_further_from_fp32_than_transformers(tmp_path, case):
    errs = _errors(tmp_path, case)
    worst32 = max((e[2], n) for n, e in errs.items())
    assert worst32[0] < 1e-4, f"ours in fp32 differs from transformers' fp32 step: {worst32}"
    assert_no_further_from_fp32(errs)


def test_a_wrong_gradient_scale_fails_the_comparison(tmp_path):
    def plant(model):  # 25% too much gradient on one per-head vector
        next(p for n, p in model.named_parameters() if n.endswith(".D")).register_hook(
            lambda g: g * 1.25)
    with pytest.raises(AssertionError, match=r"mamba\.D"):
        assert_no_further_from_fp32(_errors(tmp_path, "bamba-attn02-tied", plant))
