"""The Triton cross-entropy row kernel (GPU path of linear_cross_entropy) against the torch form,
run on CPU under Triton's interpreter in a process of its own. On the GPU the kernel runs
compiled inside the fused training path (tests/gpu, benchmarks)."""

import pytest

from conftest import helper_json

pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[dev]' has it)")


@pytest.fixture(scope="module")
def results():
    return helper_json("loss_kernel_under_interpreter.py")


@pytest.mark.parametrize("case", ["fp32_one_block", "fp32_three_blocks"])
def test_row_losses_and_gradient_match_torch_in_fp32(results, case):
    r = results[case]
    assert r["loss_err"] < 1e-4 and r["grad_err"] < 1e-6, r
    assert r["ignored_grad_max"] == 0.0 and r["loss_dtype"] == "torch.float32"


def test_bf16_logits_keep_an_fp32_loss_and_a_bf16_gradient(results):
    r = results["bf16"]
    assert r["loss_dtype"] == "torch.float32" and r["grad_dtype"] == "torch.bfloat16"
    assert r["loss_err"] < 1e-4, r  # the loss is exact on the bf16 inputs
    assert r["grad_err"] <= 2 ** -8, r  # one bf16 rounding of a value in [-1, 1]
    assert r["ignored_grad_max"] == 0.0


def test_linear_cross_entropy_is_the_same_with_and_without_the_kernel(results):
    r = results["linear"]
    assert r["loss_err"] < 1e-5 and r["nograd_loss_err"] < 1e-5, r
    assert r["hidden_grad_err"] < 1e-6 and r["weight_grad_err"] < 1e-6, r
