"""``kernels.ssd=mamba_train`` without a GPU (the config key itself:
test_ssd_kernel_choice.py): the one-line failure when mamba_ssm lacks a private name it calls,
and (where mamba_ssm's sources import) its Functions against mamba_ssm's own under Triton's
interpreter, bit for bit. On the GPU: tests/gpu/test_ssd_gpu.py."""

from __future__ import annotations

import importlib.util
import types

import pytest

from conftest import helper_json
from mamba_train.models import ssd_upstream
from mamba_train.models.ssd_fla import SSDKernelError


@pytest.fixture
def fake_mamba_ssm(monkeypatch):
    """mamba_ssm's Triton modules as namespaces holding every listed name (a test edits them)."""
    modules = {m: types.SimpleNamespace() for m in set(ssd_upstream.PRIVATE_NAMES.values())}
    for name, module in ssd_upstream.PRIVATE_NAMES.items():
        setattr(modules[module], name, lambda *a, **k: None)
    monkeypatch.setattr(ssd_upstream.importlib, "import_module",
                        lambda path: modules[path.removeprefix(ssd_upstream._PREFIX)])
    ssd_upstream._modules.cache_clear()
    yield modules
    ssd_upstream._modules.cache_clear()


def test_missing_private_name_fails_with_one_line_naming_it(fake_mamba_ssm):
    ssd_upstream.check()  # all present
    ssd_upstream._modules.cache_clear()
    del fake_mamba_ssm["ssd_chunk_scan"]._chunk_scan_bwd_dcb
    with pytest.raises(SSDKernelError) as e:
        ssd_upstream.check()
    msg = str(e.value)
    assert "\n" not in msg and "ssd_chunk_scan._chunk_scan_bwd_dcb" in msg
    assert f"mamba-ssm=={ssd_upstream.TESTED_WITH}" in msg and "kernels.ssd=mamba_ssm" in msg


def test_missing_causal_conv1d_fails_with_one_line(fake_mamba_ssm):
    fake_mamba_ssm["ssd_combined"].causal_conv1d_fwd_function = None  # what mamba_ssm leaves
    with pytest.raises(SSDKernelError, match="needs the causal-conv1d package"):
        ssd_upstream.check()


def test_names_are_read_at_call_time(fake_mamba_ssm):
    """A patch of a mamba_ssm global after the first check (what kernels.norm_backward does to
    ssd_combined._layer_norm_bwd) reaches the Functions."""
    up = ssd_upstream.upstream()
    marker = object()
    fake_mamba_ssm["ssd_combined"]._layer_norm_bwd = marker
    assert up._layer_norm_bwd is marker
    with pytest.raises(AttributeError, match="not in ssd_upstream.PRIVATE_NAMES"):
        up._chunk_scan_fwd_wip  # noqa: B018 -- an unlisted name is refused


@pytest.mark.slow
def test_functions_bit_identical_to_mamba_ssm_under_interpreter():
    pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[dev]' has it)")
    if importlib.util.find_spec("mamba_ssm") is None:
        pytest.skip("mamba_ssm is not importable here; put its sources on PYTHONPATH "
                    "(e.g. a checkout of state-spaces/mamba at v2.3.2) to run this on CPU")
    results = helper_json("ssd_under_interpreter.py", timeout=1200)
    # MAMBA_TRAIN_SSD_FORWARD=fused (models/ssd_fwd_kernel.py): same formulas, fp32 sums in
    # another order, so within fp32 rounding of mamba_ssm's (relative to each tensor's largest)
    fused = results.pop("fused_forward")
    assert max(fused.values(), default=0.0) < 1e-5, fused
    assert results == {"chunk_scan": {}, "split": {}, "mixer": {}}, results
