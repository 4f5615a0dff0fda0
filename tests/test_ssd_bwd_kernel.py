"""models/ssd_bwd_kernel.py without a GPU: its Triton kernel under Triton's interpreter against a
float64 PyTorch form of d(CB) and the intra-chunk dA gradient (a process of its own: the
interpreter is chosen before triton is imported), for a length no chunk divides, several row
blocks per chunk or one, heads of a group in one program or split over two, document boundaries.
Against mamba_ssm's two kernels on the GPU: tests/gpu/test_ssd_gpu.py."""

import pytest

from conftest import helper_json


@pytest.fixture(scope="module")
def results():
    pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[dev]' has it)")
    return helper_json("ssd_bwd_kernel_under_interpreter.py")


@pytest.mark.parametrize("case", ["one_split", "head_splits_seq_idx", "one_row_block"])
def test_dcb_and_dA_gradient_match_float64(results, case):
    r = results[case]
    assert r["dcb"] < 1e-5 and r["dda"] < 1e-5, r
    # mamba_ssm's shapes: dCB (batch, chunks, groups, chunk, chunk), ddA (batch, heads, chunks, chunk)
    assert r["shapes"] == [[2, 3, 2, 32, 32], [2, 4, 3, 32]], r
