"""models/ssd_bwd_kernel.py (d(CB) + the intra-chunk dA term) and models/ssd_bwd_fused.py (those
and dx, dΔ, dD) without a GPU: their Triton kernels under Triton's interpreter against a float64
PyTorch form of the gradients (a process of its own: the interpreter is chosen before triton is
imported), for a length no chunk divides, several row / column blocks per chunk or one, heads of a
group in one program or split over two, document boundaries, D per head or per channel.
Against mamba_ssm's kernels on the GPU: tests/gpu/test_ssd_gpu.py."""

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


@pytest.mark.parametrize("case", ["fused_one_split", "fused_splits_seq_idx_D_hdim",
                                  "fused_one_column_block"])
def test_fused_backward_matches_float64(results, case):
    r = results[case]
    assert max(r[k] for k in ("dx", "ddt", "dD", "dcb", "dda")) < 1e-5, r
    D_shape = [4, 16] if "D_hdim" in case else [4]
    assert r["shapes"] == [[2, 80, 4, 16], [2, 4, 3, 32], D_shape, [2, 3, 2, 32, 32],
                           [2, 4, 3, 32]], r
