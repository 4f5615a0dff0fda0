"""models/norm_backward.py without a GPU: its Triton kernel under Triton's interpreter against
autograd through the PyTorch form of both norms (a process of its own: the interpreter is chosen
before triton is imported), the grid arithmetic, and the config switch. Against mamba_ssm's own
kernels on the GPU: tests/gpu/test_norm_backward_gpu.py."""

from __future__ import annotations

import pytest

from conftest import TINY, compose_config, helper_json
from mamba_train.models import norm_backward
from mamba_train.train import train


@pytest.fixture(scope="module")
def results():
    pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[dev]' has it)")
    return helper_json("norm_backward_under_interpreter.py")


@pytest.mark.parametrize("case", ["gated", "gated_one_program"])
def test_gated_norm_gradients_match_autograd(results, case):
    r = results[case]
    assert max(r["dx"], r["dz"], r["dw"], r["y"]) < 1e-4, r
    assert r["dz_in_place"] and r["y_in_place"], "dz / the recomputed output must go where asked"


def test_add_norm_gradients_match_autograd(results):
    r = results["add_norm"]
    assert r["dres_in"] < 1e-5 and r["dw"] < 1e-4, r
    assert r["dx_dtype"] == "torch.bfloat16" and r["dx_bf16_rel"] <= 2 ** -7, r
    assert r["adapter_same"], "mamba_ssm-shaped adapter must return the kernel's tensors"


@pytest.mark.parametrize("sms,rows,groups,block_m", [
    (1, 1, 1, 1), (78, 7, 1, 16), (132, 4099, 1, 2), (132, 16384, 1, 4), (132, 16384, 4, 8),
    (2, 37, 4, 16), (132, 53, 64, 1)])
@pytest.mark.parametrize("pps", [1, 3, 8])
def test_row_blocks_cover_every_row_once(monkeypatch, sms, rows, groups, block_m, pps):
    monkeypatch.setattr(norm_backward, "programs_per_sm", pps)
    blocks, per_block = norm_backward.row_blocks(sms, rows, groups, block_m)
    assert per_block % block_m == 0
    assert blocks * per_block >= rows > (blocks - 1) * per_block  # all covered, last one not empty
    assert blocks <= max(1, -(-sms * pps // groups))  # no wider than asked


def test_unknown_norm_backward_is_a_config_error(tmp_path):
    with pytest.raises(ValueError, match="kernels.norm_backward='triton' must be mamba_train or mamba_ssm"):
        train(compose_config([*TINY, "recipe=debug-mamba2", "trainer.max_steps=1",
                              "kernels.norm_backward=triton"], tmp_path))
