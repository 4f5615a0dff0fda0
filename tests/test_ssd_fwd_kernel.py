"""models/ssd_fwd_kernel.py (the SSD forward's chunk states, state passing and chunk scan as one
kernel walking the chunks) without a GPU: under Triton's interpreter (a process of its own: the
interpreter is chosen before triton is imported) against a float64 token-by-token recurrence
(outputs, the output before the z gate, the fp32 state entering each chunk that the backward
reads, the final state) and the reference backend's ``ssd_chunked``: an odd length, grouped B/C,
several headdim and row blocks, document boundaries inside a chunk and on a chunk's first token,
initial states, D per head or per channel, masked d_state / headdim, a clamping dt_limit.
Against mamba_ssm's Functions: tests/test_ssd.py (slow, with mamba_ssm's sources) and
tests/gpu/test_ssd_fwd_gpu.py."""

import pytest

from conftest import helper_json
from mamba_train.models import ssd
from mamba_train.models.ssd_fla import SSDKernelError


@pytest.fixture(scope="module")
def results():
    pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[dev]' has it)")
    return helper_json("ssd_fwd_under_interpreter.py")


CASES = {"groups_seq_init_gate": ([2, 80, 4, 32], [2, 3, 4, 32, 16], [2, 4, 32, 16]),
         "plain_masked": ([1, 64, 2, 24], [1, 2, 2, 24, 12], [1, 2, 24, 12]),
         "seq_no_init": ([1, 72, 2, 16], [1, 3, 2, 16, 16], [1, 2, 16, 16])}


@pytest.mark.parametrize("case", list(CASES))
def test_fused_forward_matches_float64_recurrence(results, case):
    r = results[case]
    assert max(r.get(k, 0.0) for k in ("out", "out_x", "states", "final")) < 1e-5, r
    # the layouts ForwardKept and mamba_ssm's state passing use: states (batch, chunks, heads,
    # headdim, d_state) and final states in fp32
    assert r["shapes"] == [list(s) for s in CASES[case]], r
    assert r["dtypes"] == ["torch.float32"] * 3, r


@pytest.mark.parametrize("case", ["plain_masked", "seq_no_init"])
def test_fused_forward_matches_reference_backend(results, case):
    assert results[case]["reference_backend"] < 1e-5, results[case]


def test_forward_choice_checked_with_one_line(monkeypatch):
    assert ssd._env_choice("MAMBA_TRAIN_SSD_FORWARD", ssd.FORWARD_CHOICES) == "mamba_ssm"
    monkeypatch.setenv("MAMBA_TRAIN_SSD_FORWARD", "fused")
    assert ssd._env_choice("MAMBA_TRAIN_SSD_FORWARD", ssd.FORWARD_CHOICES) == "fused"
    monkeypatch.setenv("MAMBA_TRAIN_SSD_FORWARD", "triton")
    with pytest.raises(SSDKernelError, match=r"^MAMBA_TRAIN_SSD_FORWARD='triton': use one of "
                                             r"mamba_ssm, fused$"):
        ssd._env_choice("MAMBA_TRAIN_SSD_FORWARD", ssd.FORWARD_CHOICES)
