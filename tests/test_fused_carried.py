"""The fused backend's context-parallel glue (``models/fused_carried.py``) and its PyTorch terms
(``models/carried_terms.py``), on the CPU in fp64.

The kernels it calls (causal-conv1d, mamba_ssm's selective scan, chunk scan and Mamba-3 SISO
Function) are stood in for by the reference ops with the kernels' call forms and constraints
(channel-last conv input with ``seq_idx``; final states from zero; Mamba-3's input states); the
fused forward on the reference module's parameters, slice after slice with the state carried,
must then give the whole-sequence reference outputs and gradients. The GPU run with the real
kernels is ``tests/gpu/test_context_parallel_gpu.py``.
"""

from __future__ import annotations

import importlib
import math
import sys
import types

import pytest
import torch

from mamba_train.models import carried_terms
from mamba_train.models.attention import CausalSelfAttention
from mamba_train.models.reference import Mamba, Mamba2, Mamba3
from mamba_train.models.reference.common import _doc_start_mask, causal_conv1d
from mamba_train.models.reference.mamba3_ops import _prepare, mamba3_siso_chunked
from mamba_train.models.reference.selective_scan import selective_scan
from mamba_train.models.reference.ssd import _prepare_dt, _SSDCore, ssd_state_output
from mamba_train.models.state_passing import StateCarry

F64 = torch.float64


# ------------------------------------------------------------------- stand-ins for the kernels
def _conv_fn(x, weight, bias=None, seq_idx=None, activation=None):
    if seq_idx is not None:
        assert x.stride(1) == 1, "causal-conv1d takes seq_idx with channel-last input only"
        assert seq_idx.dtype == torch.int32 and seq_idx.is_contiguous()
    assert weight.dim() == 2
    return causal_conv1d(x, weight, bias, seq_idx=seq_idx, activation=activation)


def _chunk_scan(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, dt_softplus=False,
                seq_idx=None, dt_limit=(0.0, float("inf")), return_final_states=False):
    assert z is None and return_final_states
    dtf = _prepare_dt(dt, dt_bias, dt_softplus, dt_limit, x.dtype)
    log_a = dtf * A
    start = _doc_start_mask(seq_idx, x.shape[1])
    if start is not None:
        log_a = log_a.masked_fill(start.unsqueeze(-1), -math.inf)
    y, final = _SSDCore.apply(x * dtf.unsqueeze(-1), log_a, B, C, chunk_size)
    return y + x * (D if D.dim() == 2 else D[:, None]), final


def _siso(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D=None, Z=None, chunk_size=64,
          cu_seqlens=None, input_states=None):
    """``fused.mamba3_siso_scan`` with input states, sequence by sequence (segment)."""
    angle, ssm, k, v = input_states
    assert not ssm.requires_grad and float(ssm.abs().max()) == 0
    if cu_seqlens is None:
        pieces = [(r, 0, V.shape[1]) for r in range(V.shape[0])]
    else:
        cu = cu_seqlens.tolist()
        pieces = [(0, a, b) for a, b in zip(cu[:-1], cu[1:])]
    outs, finals = [], []
    for i, (r, a, b) in enumerate(pieces):
        carry = StateCarry({"angle": angle[i:i + 1], "kv": torch.cat([k, v], -1)[i:i + 1]})
        sl = slice(r, r + 1)
        outs.append(mamba3_siso_chunked(
            Q[sl, a:b], K[sl, a:b], V[sl, a:b], ADT[sl, :, a:b], DT[sl, :, a:b],
            Trap[sl, :, a:b], Q_bias, K_bias, Angles[sl, a:b], D=D,
            Z=None if Z is None else Z[sl, a:b], chunk_size=chunk_size, carry=carry))
        finals.append(carry.outgoing["ssm"])
    return torch.cat(outs, 0 if cu_seqlens is None else 1), torch.cat(finals)


@pytest.fixture
def fused_carried(monkeypatch):
    """models/fused_carried.py imported against the stand-ins (and forgotten afterwards)."""
    fakes = {
        "causal_conv1d": {"causal_conv1d_fn": _conv_fn},
        "mamba_ssm": {}, "mamba_ssm.ops": {}, "mamba_ssm.ops.triton": {},
        "mamba_ssm.ops.selective_scan_interface": {"selective_scan_fn": selective_scan},
        "mamba_ssm.ops.triton.ssd_combined": {"mamba_chunk_scan_combined": _chunk_scan},
    }
    for name, attrs in fakes.items():
        monkeypatch.setitem(sys.modules, name, types.SimpleNamespace(**attrs))
    name = "mamba_train.models.fused_carried"
    old = sys.modules.pop(name, None)
    try:
        yield importlib.import_module(name)
    finally:
        sys.modules.pop(name, None)
        if old is not None:
            sys.modules[name] = old


# ------------------------------------------------------------------------------ mixers, sliced
D_MODEL = 16
BOUNDS = (0, 9, 20, 32)


def _seq_idx(batch, seqlen):
    """Documents start inside slices, at a cut (row 0 at 9) and not at all in the last slice."""
    doc = torch.zeros(batch, seqlen, dtype=torch.int32)
    doc[0, 5:] += 1
    doc[0, 9:] += 1
    doc[1, 14:] += 1
    return doc


def _run(forward, x, seq_idx):
    carry, outs = StateCarry(), []
    for lo, hi in zip(BOUNDS[:-1], BOUNDS[1:]):
        sl = None if seq_idx is None else seq_idx[:, lo:hi]
        outs.append(forward(x[:, lo:hi], sl, carry))
        carry = carry.next(sl, hi - lo)
    return torch.cat(outs, dim=1)


def _grads(mixer, x, out, weight):
    mixer.zero_grad()
    x.grad = None
    (out * weight).sum().backward()
    return {"input": x.grad.clone(), **{n: p.grad.clone() for n, p in mixer.named_parameters()}}


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


CASES = {
    "mamba1": (lambda: Mamba(D_MODEL, d_state=4), False),
    "mamba2": (lambda: Mamba2(D_MODEL, d_state=8, headdim=8, ngroups=2, chunk_size=4), True),
    "mamba2-gated-mlp": (lambda: Mamba2(D_MODEL, d_state=8, headdim=8, d_ssm=16,
                                        rmsnorm=False, chunk_size=4), True),
    "mamba3": (lambda: Mamba3(D_MODEL, d_state=8, headdim=8, chunk_size=4), True),
    "mamba3-outnorm": (lambda: Mamba3(D_MODEL, d_state=8, headdim=8, chunk_size=4,
                                      is_outproj_norm=True), False),
}


@pytest.mark.parametrize("kind", list(CASES))
def test_fused_slices_match_whole_reference(kind, fused_carried):
    build, docs = CASES[kind]
    torch.manual_seed(0)
    mixer = build().double()
    with torch.no_grad():
        for name, p in mixer.named_parameters():
            if name in ("A_log", "dt_bias"):
                p.uniform_(-1.0, 0.5)
    if kind.startswith("mamba1"):
        def forward(x, sl, carry):
            return fused_carried.mamba1_forward(mixer, x, carry)
    elif kind.startswith("mamba2"):
        def forward(x, sl, carry):
            return fused_carried.mamba2_forward(mixer, x, sl, carry)
    else:
        mixer.scan = lambda inputs, sl, carry=None: (
            type(mixer).scan(mixer, inputs, sl) if carry is None
            else fused_carried.mamba3_scan(mixer, inputs, sl, carry, _siso))

        def forward(x, sl, carry):
            return mixer(x, seq_idx=sl, carry=carry)
    x = torch.randn(2, BOUNDS[-1], D_MODEL, dtype=F64, requires_grad=True)
    seq_idx = _seq_idx(2, BOUNDS[-1]) if docs else None
    weight = torch.randn(2, BOUNDS[-1], D_MODEL, dtype=F64)
    whole = mixer(x, seq_idx=seq_idx)
    ref = _grads(mixer, x, whole, weight)
    sliced = _run(forward, x, seq_idx)
    got = _grads(mixer, x, sliced, weight)
    torch.testing.assert_close(sliced, whole, rtol=1e-9, atol=1e-9)
    # A_log, D and the dt biases enter the scans through .float() (as in mamba_ssm), so their
    # gradients are rounded to fp32 per slice: 1e-6 of the largest entry; a wrong term is O(1)
    worst = {n: _rel(got[n], ref[n]) for n in ref}
    assert max(worst.values()) <= 1e-6, worst


# -------------------------------------------------------------------------- the PyTorch terms
def _mamba1_oracle(u, delta, A, B, C, h_in):
    """Token by token: the final state from zero, and the output of h_in alone."""
    h0, h1, ys = torch.zeros_like(h_in), h_in, []
    for t in range(u.shape[-1]):
        a = torch.exp(delta[..., t, None] * A)
        h0 = a * h0 + (delta[..., t] * u[..., t])[..., None] * B[:, None, :, t]
        h1 = a * h1
        ys.append((h1 * C[:, None, :, t]).sum(-1))
    return h0, torch.exp(delta.sum(-1)[..., None] * A), torch.stack(ys, -1)


@pytest.mark.parametrize("chunk_elements", [1 << 24, 40])  # one chunk; chunks of 1-2 tokens
def test_mamba1_terms_match_token_loop(chunk_elements, monkeypatch):
    monkeypatch.setattr(carried_terms, "_CHUNK_ELEMENTS", chunk_elements)
    torch.manual_seed(1)
    b, d, n, l = 2, 3, 4, 11
    leaves = [torch.randn(b, d, l, dtype=F64), torch.rand(b, d, l, dtype=F64) * 0.5,
              -torch.rand(d, n, dtype=F64) * 2, torch.randn(b, n, l, dtype=F64),
              torch.randn(b, n, l, dtype=F64), torch.randn(b, d, n, dtype=F64)]
    for t in leaves:
        t.requires_grad_()
    u, delta, A, B, C, h_in = leaves
    final, decay = carried_terms.selective_scan_summary(u, delta, A, B)
    y = carried_terms.selective_scan_incoming_output(C, delta, A, h_in)
    ref = _mamba1_oracle(u, delta, A, B, C, h_in)
    ws = [torch.randn_like(t) for t in ref]
    got_out = (final, decay, y)
    for g, r in zip(got_out, ref):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)
    dg = torch.autograd.grad(sum((g * w).sum() for g, w in zip(got_out, ws)), leaves)
    dr = torch.autograd.grad(sum((r * w).sum() for r, w in zip(ref, ws)), leaves)
    for g, r in zip(dg, dr):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-11)


def test_mamba3_terms_match_reference_prepare():
    """The angle the slice adds and the incoming state's output equal what the reference's
    ``_prepare`` + ``ssd_state_output`` compute with the same incoming angle (documents start
    inside the slice, and at its first token in row 1)."""
    torch.manual_seed(2)
    b, l, h, g, n, p, s = 2, 10, 4, 2, 8, 3, 2
    Q = torch.randn(b, l, g, n, dtype=F64, requires_grad=True)
    ang = torch.randn(b, l, s, dtype=F64, requires_grad=True)
    DT = (torch.rand(b, h, l, dtype=F64) + 0.1).requires_grad_()
    ADT = -(torch.rand(b, h, l, dtype=F64) * 0.3)
    Q_bias = torch.randn(h, n, dtype=F64)
    theta_in = (torch.rand(b, h, s, dtype=F64) * 6).requires_grad_()
    h_in = torch.randn(b, h, p, n, dtype=F64, requires_grad=True)
    seq_idx = torch.zeros(b, l, dtype=torch.int32)
    seq_idx[0, 6:] = 1
    carry = StateCarry({"angle": theta_in}, offset=4,
                       prev_seq_idx=torch.tensor([[0] * 4, [0, 0, 0, 7]], dtype=torch.int32))
    start = carry.doc_starts(seq_idx, l)
    log_a = ADT.transpose(1, 2).masked_fill(start.unsqueeze(-1), -math.inf)
    V = torch.zeros(b, l, h, p, dtype=F64)
    q_ref, *_ = _prepare(Q, Q, V, ADT, DT, ADT, Q_bias, Q_bias,
                         ang.unsqueeze(2).expand(-1, -1, h, -1), seq_idx, F64, carry)
    ref = ssd_state_output(q_ref, log_a, h_in)
    got = carried_terms.mamba3_incoming_output(Q, Q_bias, ang, DT, log_a, theta_in, h_in)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    w = torch.randn_like(ref)
    leaves = (Q, ang, DT, theta_in, h_in)
    for a, r in zip(torch.autograd.grad((got * w).sum(), leaves),
                    torch.autograd.grad((ref * w).sum(), leaves)):
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-11)
    # the outgoing angle: what the slice adds, plus the incoming one where no document starts
    whole = ~start.any(1)
    own = carried_terms.mamba3_final_angle(ang, DT, start)
    out = carry.outgoing["angle"]
    diff = torch.remainder(own + theta_in * whole[:, None, None] - out + math.pi, 2 * math.pi)
    torch.testing.assert_close(diff, torch.full_like(diff, math.pi), rtol=0, atol=1e-10)


def test_grouped_state_output_matches_per_head_formula():
    torch.manual_seed(3)
    C = torch.randn(2, 7, 2, 5, dtype=F64)
    log_a = -torch.rand(2, 7, 6, dtype=F64)
    h0 = torch.randn(2, 6, 3, 5, dtype=F64)
    per_head = torch.einsum("blhn,bhpn->blhp", C.repeat_interleave(3, dim=2), h0)
    ref = per_head * torch.exp(torch.cumsum(log_a, 1)).unsqueeze(-1)
    torch.testing.assert_close(ssd_state_output(C, log_a, h0), ref, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ attention: varlen layout
def _varlen_on_cpu(q, k, v, cu_q, cu_k, max_q, max_k, scale=None, window_size=(-1, -1),
                   enable_gqa=False):
    """torch's varlen flash attention, segment by segment (causal aligned bottom-right)."""
    from torch.nn.attention.bias import causal_lower_right
    assert window_size == (-1, 0)
    outs = []
    for i in range(len(cu_q) - 1):
        qs = q[cu_q[i]:cu_q[i + 1]].transpose(0, 1)
        ks, vs = (t[cu_k[i]:cu_k[i + 1]].transpose(0, 1) for t in (k, v))
        assert qs.shape[1] <= max_q and ks.shape[1] <= max_k
        rep = qs.shape[0] // ks.shape[0]
        ks, vs = ks.repeat_interleave(rep, 0), vs.repeat_interleave(rep, 0)
        mask = causal_lower_right(qs.shape[1], ks.shape[1])
        outs.append(torch.nn.functional.scaled_dot_product_attention(
            qs, ks, vs, attn_mask=mask, scale=scale).transpose(0, 1))
    return torch.cat(outs)


def _varlen_torch_2_11(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None,
                       scale=None, window_size=(-1, -1)):
    """torch 2.11's signature: no ``enable_gqa``, so equal head counts only."""
    assert key.shape[1] == query.shape[1] and return_aux is None
    return _varlen_on_cpu(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale=scale,
                          window_size=window_size)


def _varlen_torch_2_10(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False,
                       return_aux=None):
    raise AssertionError("a causal flag without window_size is not used")


@pytest.fixture
def torch_varlen(monkeypatch):
    """Replace torch's varlen_attn with another release's signature (the adapter re-reads it)."""
    import torch.nn.attention.varlen as varlen
    from mamba_train.models import attention

    def use(fn):
        monkeypatch.setattr(varlen, "varlen_attn", fn)
        attention._varlen_attn.cache_clear()
    yield use
    monkeypatch.undo()
    attention._varlen_attn.cache_clear()


def test_varlen_adapter_reads_the_installed_signature(torch_varlen):
    from mamba_train.models import attention
    torch_varlen(_varlen_torch_2_10)
    assert attention._varlen_attn() is None  # packed documents fall back to the dense mask
    torch_varlen(_varlen_on_cpu)
    assert attention._varlen_attn() is _varlen_on_cpu  # enable_gqa: called as it is


@pytest.mark.parametrize("api", ["torch-2.13", "torch-2.11"])
def test_sliced_attention_varlen_layout_matches_whole_sequence(api, monkeypatch, torch_varlen):
    from mamba_train.models import attention
    torch.manual_seed(4)
    mixer = CausalSelfAttention(D_MODEL, num_heads=4, num_heads_kv=2, rotary_emb_dim=4).double()
    x = torch.randn(2, BOUNDS[-1], D_MODEL, dtype=F64, requires_grad=True)
    seq_idx = _seq_idx(2, BOUNDS[-1])
    weight = torch.randn(2, BOUNDS[-1], D_MODEL, dtype=F64)
    whole = mixer(x, seq_idx=seq_idx)
    ref = _grads(mixer, x, whole, weight)
    calls = []
    monkeypatch.setattr(attention, "varlen_eligible", lambda q: calls.append(1) or True)
    if api == "torch-2.13":
        monkeypatch.setattr(attention, "_varlen_attn", lambda: _varlen_on_cpu)
    else:  # key/value heads repeated by the adapter
        torch_varlen(_varlen_torch_2_11)
    sliced = _run(lambda xs, sl, carry: mixer(xs, seq_idx=sl, carry=carry), x, seq_idx)
    got = _grads(mixer, x, sliced, weight)
    assert calls, "the varlen path did not run"
    torch.testing.assert_close(sliced, whole, rtol=1e-10, atol=1e-10)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-9, atol=1e-10, msg=name)
