"""Context parallelism on the GPU, one device.

What is checked: the state-passing maths (``models/state_passing.py``) on CUDA tensors -- a
sequence run as two slices with the state carried gives the whole-sequence outputs and
gradients (reference mixers, fp32, and under bf16 autocast). The two-process equality is
checked on CPU (``tests/test_context_parallel.py``).

Not yet: the fused kernels' own initial/final-state arguments (mamba_chunk_scan_combined's
``initial_states``/``return_final_states``, causal-conv1d's ``initial_states``, Mamba-3's
``Input_States``): ``strategy=fsdp2`` refuses ``backend=fused`` with ``context_parallel_size >
1``, and these tests use the reference backend on the GPU.

Tolerances: fp32 on the GPU sums in other orders (TF32 off): 1e-4 of the largest entry; bf16
autocast rounds the matmul inputs of each slice separately: 2e-2.
"""

from __future__ import annotations

import pytest
import torch

from mamba_train.models.reference import Mamba, Mamba2, Mamba3
from mamba_train.models.state_passing import StateCarry

MIXERS = {
    "mamba1": lambda: Mamba(64, d_state=16),
    "mamba2": lambda: Mamba2(64, d_state=64, headdim=32, chunk_size=64),
    "mamba3": lambda: Mamba3(64, d_state=32, headdim=32, chunk_size=32),
}


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def _max_rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("kind", list(MIXERS))
def test_two_slices_match_whole_sequence_on_gpu(kind, autocast, record):
    torch.manual_seed(0)
    mixer = MIXERS[kind]().cuda()
    x = torch.randn(2, 512, 64, device="cuda", requires_grad=True)
    seq_idx = torch.zeros(2, 512, dtype=torch.int32, device="cuda")
    seq_idx[:, 300:] = 1  # a document starting inside the second slice
    w = torch.randn(2, 512, 64, device="cuda")

    def run(sliced):
        mixer.zero_grad()
        x.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            if sliced:
                first = StateCarry()
                a = mixer(x[:, :256], seq_idx=seq_idx[:, :256], carry=first)
                b = mixer(x[:, 256:], seq_idx=seq_idx[:, 256:],
                          carry=first.next(seq_idx[:, :256], 256))
                y = torch.cat([a, b], dim=1)
            else:
                y = mixer(x, seq_idx=seq_idx)
        (y.float() * w).sum().backward()
        return y.float(), {"x": x.grad.clone(),
                           **{n: p.grad.clone() for n, p in mixer.named_parameters()}}

    y_ref, g_ref = run(False)
    y, g = run(True)
    tol = 2e-2 if autocast else 1e-4
    worst = max(_max_rel(g[n], g_ref[n]) for n in g_ref)
    record(f"context parallel maths on GPU, {kind} {'bf16' if autocast else 'fp32'}: "
           f"output {_max_rel(y, y_ref):.2e}, worst gradient {worst:.2e}")
    assert _max_rel(y, y_ref) <= tol
    assert worst <= tol
