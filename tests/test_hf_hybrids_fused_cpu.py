"""The fused backend's hybrids on CPU: mamba_ssm's Triton kernels under Triton's interpreter
(fp32; tests/helpers/hybrids_fused_under_interpreter.py), against transformers' own model. Also
pins which transformers models compute, in training mode, a function other than their own
(``transformers_training_path_is_its_model``): the GPU comparison uses their eval mode there.
Needs mamba_ssm's Python sources importable (a checkout of state-spaces/mamba at v2.3.2 on
PYTHONPATH); skipped otherwise."""

from __future__ import annotations

import importlib.util

import pytest

pytest.importorskip("transformers")
pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[dev]' has it)")

from conftest import helper_json  # noqa: E402
from test_hf_hybrids import CASES, transformers_training_path_is_its_model  # noqa: E402


@pytest.mark.slow
def test_fused_hybrids_equal_transformers_and_its_training_path_is_known():
    if importlib.util.find_spec("mamba_ssm") is None:
        pytest.skip("mamba_ssm is not importable here; put its sources on PYTHONPATH "
                    "(e.g. a checkout of state-spaces/mamba at v2.3.2) to run this on CPU")
    results = helper_json("hybrids_fused_under_interpreter.py", *sorted(CASES), timeout=1800)
    off = {case: r["ours"] for case, r in results.items() if r["ours"] > 2e-5}
    assert not off, f"fused backend differs from transformers' model (fp32): {off}"
    for case, r in results.items():
        exact = transformers_training_path_is_its_model(CASES[case])
        assert (r["hf_train"] < 2e-5) == exact, (
            f"{case}: transformers' training path is {r['hf_train']:.2e} from its eval path; "
            f"transformers_training_path_is_its_model says {exact}: update it")
