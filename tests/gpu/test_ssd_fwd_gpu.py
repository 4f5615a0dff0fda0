"""``MAMBA_TRAIN_SSD_FORWARD=fused`` under ``kernels.ssd=mamba_train`` (models/ssd_fwd_kernel.py:
mamba_ssm's chunk_state + state_passing + chunk_scan as one kernel walking the chunks) on the
GPU: outputs, final states and the gradients through ours (the fused forward's kept states into
models/ssd.py's backward) against mamba_ssm's ``mamba_chunk_scan_combined``, bf16 and fp32; the
kept states against the mamba_ssm forward's; the autotuned settings giving the same numbers;
repeatable and unchanged in a captured CUDA graph. Same formulas, fp32 sums in another order:
fp32 state tensors agree to fp32 rounding; bf16 outputs may differ in one bf16 rounding, which
then propagates (the 1e-2 bound of tests/gpu/test_ssd_gpu.py's fused kernels). Run with
``TRITON_F32_DEFAULT=ieee`` (the device part ``ssdfwd``) for the tight fp32 bound; under tf32
products the bound is 5e-3."""

import os

import pytest
import torch

from gpu.test_ssd_gpu import _chunk_scan_case, _grads_of, _seq_idx
from mamba_train.models import ssd, ssd_fwd_kernel
from mamba_train.models.ssd import ssd_chunk_scan

DEV = "cuda"
FP32_BOUND = 1e-4 if os.environ.get("TRITON_F32_DEFAULT") == "ieee" else 5e-3
CASES = [  # (dtype, length, ngroups, seq_idx, h0, z), as tests/gpu/test_ssd_gpu.py's
    (torch.bfloat16, 2048, 1, False, False, False),
    (torch.bfloat16, 2000, 2, True, True, True),
    (torch.float32, 2000, 2, True, True, True)]


@pytest.fixture(autouse=True)
def fused_forward(monkeypatch):
    """Our forward with mamba_ssm's backward kernels, in mamba_ssm's deterministic mode (no
    atomics in the backward, so runs repeat)."""
    determinism = pytest.importorskip("mamba_ssm.utils.determinism")
    monkeypatch.setattr(determinism, "_deterministic_override", True)
    monkeypatch.setattr(ssd, "fused_kernels", "none")
    monkeypatch.setattr(ssd, "forward_kernels", "fused")


def _rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-L{c[1]}-g{c[2]}-extras{c[3]}")
def test_fused_forward_and_backward_match_mamba_ssm(record, case):
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    run, leaves, names, label = _chunk_scan_case(*case)
    ours = _grads_of(run(ssd_chunk_scan), leaves)
    ref = _grads_of(run(mamba_chunk_scan_combined), leaves)
    bound = 1e-2 if case[0] == torch.bfloat16 else FP32_BOUND
    rels = {n: _rel(a, b) for n, a, b in zip(names, ours, ref)}
    for n, a, b in zip(names, ours, ref):
        assert a.dtype == b.dtype and a.shape == b.shape, n
    assert rels["final_states"] < (1e-5 if case[0] == torch.bfloat16 else FP32_BOUND), rels
    assert max(rels.values()) < bound, rels
    record(f"kernels.ssd=mamba_train forward=fused {label}: worst rel diff "
           f"{max(rels.values()):.1e} to mamba_ssm (final states {rels['final_states']:.1e}; "
           f"{len(names)} tensors)")


def _forward_inputs(dtype=torch.bfloat16, length=2000, ngroups=2):
    from mamba_ssm.ops.triton.ssd_bmm import _bmm_chunk_fwd
    from mamba_ssm.ops.triton.ssd_chunk_state import _chunk_cumsum_fwd
    _, leaves, _, _ = _chunk_scan_case(dtype, length, ngroups, True, True, True)
    x, dt, A, B, C, D, z, bias, h0 = leaves
    seq_idx = _seq_idx(x.shape[0], length)
    dA_cumsum, dt_c = _chunk_cumsum_fwd(dt, A, 256, dt_bias=bias, dt_softplus=True)
    CB = _bmm_chunk_fwd(C, B, 256, seq_idx=seq_idx, output_dtype=torch.float32)
    return (x, dt_c, dA_cumsum, CB, B, C), dict(D=D, z=z, initial_states=h0, seq_idx=seq_idx)


def test_kept_states_match_mamba_ssm_forward(record, monkeypatch):
    """The states the backward reads: ours against mamba_ssm's chunk_state + state_passing."""
    _, leaves, _, label = _chunk_scan_case(torch.bfloat16, 2000, 2, True, True, True)
    x, dt, A, B, C, D, z, bias, h0 = leaves
    seq_idx = _seq_idx(x.shape[0], 2000)
    kw = dict(D=D, z=z, dt_bias=bias, initial_states=h0, seq_idx=seq_idx, dt_softplus=True)
    ours = ssd.ssd_forward(x, dt, A, B, C, 256, **kw)
    monkeypatch.setattr(ssd, "forward_kernels", "mamba_ssm")
    ref = ssd.ssd_forward(x, dt, A, B, C, 256, **kw)
    for name in ("dt", "dA_cumsum", "CB"):  # the same kernels' outputs
        assert torch.equal(getattr(ours[3], name), getattr(ref[3], name)), name
    states = _rel(ours[3].states, ref[3].states)
    assert ours[3].states.dtype == torch.float32 and states < 1e-5, states
    assert _rel(ours[2], ref[2]) < 1e-5
    record(f"kernels.ssd=mamba_train forward=fused {label}: kept states rel diff {states:.1e} "
           "to mamba_ssm's")


def test_autotuned_settings_give_the_same_numbers(record):
    args, kw = _forward_inputs()
    results = [ssd_fwd_kernel.ssd_fwd_fused(*args, **kw, config=c) for c in ssd_fwd_kernel.CONFIGS]
    for c, r in zip(ssd_fwd_kernel.CONFIGS[1:], results[1:]):
        assert all(torch.equal(a, b) for a, b in zip(r, results[0])), c
    record(f"kernels.ssd=mamba_train forward=fused: {len(results)} autotune settings bit-identical")


def test_repeats_and_captured_graph_replays_eager(record):
    args, kw = _forward_inputs()
    eager = ssd_fwd_kernel.ssd_fwd_fused(*args, **kw)  # autotuning before capture
    again = ssd_fwd_kernel.ssd_fwd_fused(*args, **kw)
    assert all(torch.equal(a, b) for a, b in zip(eager, again))
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = ssd_fwd_kernel.ssd_fwd_fused(*args, **kw)
    graph.replay()
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(eager, captured))
    record("kernels.ssd=mamba_train forward=fused: repeat and captured replay bit-identical to "
           "eager")
