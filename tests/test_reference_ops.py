"""Reference Mamba-1/Mamba-2 ops and mixers (mamba_train.models.reference).

The vectorised ops are checked against the token-by-token recurrences in float64 (outputs and
gradients), the mixers against mamba_ssm's non-fused forward written out step by step, packed
sequences (seq_idx) against per-document runs, and the parameter layout against mamba_ssm's
130m checkpoints.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mamba_train.models.init import (
    DeltaProjection,
    SSMInitError,
    check_ssm_init,
    init_weights,
)
from mamba_train.models.reference import (
    GatedRMSNorm,
    Mamba,
    Mamba2,
    causal_conv1d,
    gated_rms_norm,
    selective_scan,
    selective_scan_sequential,
    ssd_chunked,
    ssd_sequential,
)


def random_seq_idx(b, L, gen, p, chunk_start=None):
    """Random documents per row, with a boundary after position 0 (row 0), one at the last
    position, and optionally one exactly at ``chunk_start`` (a chunk boundary)."""
    rows = []
    for r in range(b):
        cuts = torch.rand(L, generator=gen) < p
        cuts[0] = False
        if L > 1:
            cuts[1] = r == 0
            cuts[L - 1] = True
        if chunk_start is not None and L > chunk_start:
            cuts[chunk_start] = True
        rows.append(torch.cumsum(cuts.to(torch.int32), 0).to(torch.int32))
    return torch.stack(rows)

F64 = torch.float64


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (norm-wise relative error; robust to near-zero entries)."""
    assert a.shape == b.shape, (a.shape, b.shape)
    a, b = a.double(), b.double()
    scale = b.abs().max().clamp_min(1e-300)
    return ((a - b).abs().max() / scale).item()


def assert_close_rel(a, b, tol, what=""):
    err = rel_err(a, b)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:g}"


def grads(out, inputs, grad_out):
    return torch.autograd.grad(out, inputs, grad_out, allow_unused=False)


def doc_seq_idx(lengths, device=None) -> torch.Tensor:
    return torch.cat([torch.full((n,), i, dtype=torch.int32) for i, n in enumerate(lengths)])


# ------------------------------------------------------------------------ selective scan (Mamba-1)
SCAN_CASES = [
    # batch, dim, dstate, seqlen, ngroups (0: B/C given as (b, n, l)), chunk, D, z, bias, seq_idx
    dict(b=2, d=4, n=3, L=16, g=0, chunk=4, D=True, z=True, bias=True, seq=False),
    dict(b=2, d=6, n=5, L=13, g=0, chunk=4, D=True, z=True, bias=True, seq=False),  # L % chunk
    dict(b=1, d=4, n=2, L=1, g=0, chunk=8, D=True, z=True, bias=True, seq=False),  # L = 1
    dict(b=2, d=6, n=3, L=11, g=2, chunk=3, D=False, z=False, bias=False, seq=False),  # groups
    dict(b=2, d=8, n=4, L=23, g=4, chunk=None, D=True, z=False, bias=True, seq=True),
    dict(b=2, d=4, n=3, L=17, g=0, chunk=5, D=True, z=True, bias=True, seq=True),
    dict(b=1, d=3, n=2, L=7, g=0, chunk=64, D=False, z=True, bias=False, seq=True),  # one chunk
]


def _scan_inputs(c, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=F64)

    b, d, n, L, g = c["b"], c["d"], c["n"], c["L"], c["g"]
    bc_shape = (b, n, L) if g == 0 else (b, g, n, L)
    inp = dict(
        u=rnd(b, d, L),
        delta=rnd(b, d, L) * 0.5,
        A=-(torch.rand(d, n, generator=gen, dtype=F64) * 2 + 0.1),
        B=rnd(*bc_shape),
        C=rnd(*bc_shape),
        D=rnd(d) if c["D"] else None,
        z=rnd(b, d, L) if c["z"] else None,
        delta_bias=rnd(d) * 0.3 if c["bias"] else None,
    )
    seq_idx = None
    if c["seq"]:
        seq_idx = random_seq_idx(b, L, gen, 0.3)
    return inp, seq_idx


def _assert_same_output_and_grads(out, ref, leaves: dict) -> None:
    """Chunked op vs its sequential oracle: output, then every input gradient (finite too)."""
    assert_close_rel(out, ref, 1e-10, "output")
    go = torch.randn_like(ref)
    names = list(leaves)
    g_out = grads(out, [leaves[k] for k in names], go)
    g_ref = grads(ref, [leaves[k] for k in names], go)
    for name, a, b in zip(names, g_out, g_ref):
        assert torch.isfinite(a).all(), f"grad {name} not finite"
        assert_close_rel(a, b, 1e-10, f"grad {name}")


@pytest.mark.parametrize("case", SCAN_CASES, ids=lambda c: f"L{c['L']}-g{c['g']}-ch{c['chunk']}"
                         f"{'-seq' if c['seq'] else ''}")
def test_selective_scan_matches_sequential(case):
    inp, seq_idx = _scan_inputs(case)
    leaves = {k: v.requires_grad_() for k, v in inp.items() if v is not None}
    kw = dict(delta_softplus=True, seq_idx=seq_idx)
    out = selective_scan(**inp, chunk_size=case["chunk"], **kw)
    ref = selective_scan_sequential(**inp, **kw)
    assert out.dtype == F64 and out.shape == inp["u"].shape
    _assert_same_output_and_grads(out, ref, leaves)


def test_selective_scan_chunk_size_invariant_and_autograd_gradcheck():
    case = dict(b=1, d=2, n=2, L=6, g=0, chunk=2, D=True, z=True, bias=True, seq=True)
    inp, seq_idx = _scan_inputs(case, seed=3)
    outs = [selective_scan(**inp, delta_softplus=True, seq_idx=seq_idx, chunk_size=c)
            for c in (1, 2, 4, 6)]
    for o in outs[1:]:
        assert_close_rel(o, outs[0], 1e-12, "chunk size")
    names = [k for k, v in inp.items() if v is not None]
    leaves = [inp[k].clone().requires_grad_() for k in names]

    def fn(*xs):
        return selective_scan(**dict(zip(names, xs)), delta_softplus=True, seq_idx=seq_idx,
                              chunk_size=4)

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-8)


def test_selective_scan_strong_decay_is_stable_fp32():
    """Decays of exp(-hundreds) per token: exp(+cumsum) * exp(-cumsum) formulations overflow."""
    gen = torch.Generator().manual_seed(1)
    b, d, n, L = 1, 4, 4, 96
    u = torch.randn(b, d, L, generator=gen)
    delta = torch.full((b, d, L), 30.0)
    delta[..., ::7] = 1e-3  # mix of near-identity and very strong decays
    A = -torch.arange(1, n + 1, dtype=torch.float32).expand(d, n) * 4
    B, C = torch.randn(b, n, L, generator=gen), torch.randn(b, n, L, generator=gen)
    for chunk in (8, 64):
        out = selective_scan(u, delta, A, B, C, chunk_size=chunk)
        assert torch.isfinite(out).all()
        ref = selective_scan_sequential(u.double(), delta.double(), A.double(), B.double(),
                                        C.double())
        assert_close_rel(out.double(), ref, 1e-5, "strong decay")


# ------------------------------------------------------------------------------- SSD (Mamba-2)
SSD_CASES = [
    # batch, seqlen, nheads, headdim, ngroups, dstate, chunk, D_has_hdim, z, seq_idx, dt_limit
    dict(b=2, L=16, h=2, p=3, g=1, n=4, chunk=4, Dh=False, z=False, seq=False, lim=None),
    dict(b=2, L=13, h=4, p=2, g=2, n=3, chunk=4, Dh=True, z=True, seq=False, lim=None),
    dict(b=1, L=1, h=2, p=2, g=1, n=2, chunk=8, Dh=False, z=True, seq=False, lim=None),
    dict(b=2, L=21, h=4, p=3, g=4, n=2, chunk=8, Dh=False, z=False, seq=True, lim=None),
    dict(b=2, L=19, h=2, p=2, g=1, n=3, chunk=4, Dh=True, z=True, seq=True, lim=(0.2, 0.9)),
    dict(b=1, L=9, h=3, p=2, g=3, n=2, chunk=16, Dh=False, z=False, seq=True, lim=None),
]


def _ssd_inputs(c, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=F64)

    b, L, h, p, g, n = c["b"], c["L"], c["h"], c["p"], c["g"], c["n"]
    inp = dict(
        x=rnd(b, L, h, p),
        dt=rnd(b, L, h),
        A=-(torch.rand(h, generator=gen, dtype=F64) * 3 + 0.2),
        B=rnd(b, L, g, n),
        C=rnd(b, L, g, n),
        D=rnd(h, p) if c["Dh"] else rnd(h),
        dt_bias=rnd(h) * 0.5,
        z=rnd(b, L, h, p) if c["z"] else None,
    )
    seq_idx = None
    if c["seq"]:
        seq_idx = random_seq_idx(b, L, gen, 0.25, chunk_start=c["chunk"])
    return inp, seq_idx


@pytest.mark.parametrize("case", SSD_CASES, ids=lambda c: f"L{c['L']}-g{c['g']}-ch{c['chunk']}"
                         f"{'-Dh' if c['Dh'] else ''}{'-z' if c['z'] else ''}"
                         f"{'-seq' if c['seq'] else ''}{'-lim' if c['lim'] else ''}")
def test_ssd_chunked_matches_sequential(case):
    inp, seq_idx = _ssd_inputs(case)
    leaves = {k: v.requires_grad_() for k, v in inp.items() if v is not None}
    kw = dict(dt_softplus=True, seq_idx=seq_idx)
    if case["lim"] is not None:
        kw["dt_limit"] = case["lim"]
    out = ssd_chunked(**inp, chunk_size=case["chunk"], **kw)
    ref = ssd_sequential(**inp, **kw)
    assert out.dtype == F64 and out.shape == inp["x"].shape
    _assert_same_output_and_grads(out, ref, leaves)


def test_ssd_dt_limit_clamps():
    case = dict(b=1, L=8, h=2, p=2, g=1, n=2, chunk=4, Dh=False, z=False, seq=False, lim=None)
    inp, _ = _ssd_inputs(case, seed=5)
    free = ssd_chunked(**inp, chunk_size=4)
    clamped = ssd_chunked(**inp, chunk_size=4, dt_limit=(0.3, 0.4))
    assert rel_err(clamped, free) > 1e-3
    # with dt already inside the limit everywhere, the limit must not matter
    inp["dt"] = torch.full_like(inp["dt"], 0.0)
    inp["dt_bias"] = torch.full_like(inp["dt_bias"], math.log(math.expm1(0.35)))
    assert_close_rel(ssd_chunked(**inp, chunk_size=4, dt_limit=(0.3, 0.4)),
                     ssd_chunked(**inp, chunk_size=4), 1e-12, "dt inside limit")


# ---------------------------------------------------------------------------- conv and norm
@pytest.mark.parametrize("L", [1, 2, 3, 10])
def test_causal_conv1d_matches_nn_conv1d(L):
    torch.manual_seed(0)
    conv = nn.Conv1d(5, 5, kernel_size=4, groups=5, padding=3, dtype=F64)
    x = torch.randn(2, 5, L, dtype=F64)
    ref = F.silu(conv(x)[..., :L])
    assert_close_rel(causal_conv1d(x, conv.weight, conv.bias), ref, 1e-12, "silu conv")
    ref_lin = conv(x)[..., :L]
    assert_close_rel(causal_conv1d(x, conv.weight.squeeze(1), conv.bias, activation=None),
                     ref_lin, 1e-12, "linear conv")
    ref_nobias = F.conv1d(x, conv.weight, None, padding=3, groups=5)[..., :L]
    assert_close_rel(causal_conv1d(x, conv.weight, None, activation=None), ref_nobias, 1e-12,
                     "no bias")


def test_causal_conv1d_seq_idx_equals_per_document():
    torch.manual_seed(0)
    w, bias = torch.randn(3, 4, dtype=F64), torch.randn(3, dtype=F64)
    lengths = [1, 2, 5, 1]
    x = torch.randn(1, 3, sum(lengths), dtype=F64)
    seq_idx = doc_seq_idx(lengths)[None]
    packed = causal_conv1d(x, w, bias, seq_idx=seq_idx)
    parts = [causal_conv1d(p, w, bias) for p in x.split(lengths, dim=-1)]
    assert_close_rel(packed, torch.cat(parts, dim=-1), 1e-14, "packed conv")
    assert rel_err(causal_conv1d(x, w, bias), torch.cat(parts, dim=-1)) > 1e-3


def _rms_norm_loop(x, weight, z, eps, group_size, norm_before_gate):
    """Group by group, written out: the rms_norm_ref semantics of mamba_ssm's layernorm_gated."""
    if z is not None and not norm_before_gate:
        x = x * z * torch.sigmoid(z)
    outs = []
    for g0 in range(0, x.shape[-1], group_size):
        xg = x[..., g0:g0 + group_size]
        outs.append(xg / torch.sqrt((xg * xg).mean(-1, keepdim=True) + eps))
    out = torch.cat(outs, -1) * weight
    if z is not None and norm_before_gate:
        out = out * z * torch.sigmoid(z)
    return out


@pytest.mark.parametrize("norm_before_gate", [False, True])
@pytest.mark.parametrize("group_size", [None, 4, 6])
def test_gated_rms_norm(norm_before_gate, group_size):
    torch.manual_seed(0)
    x, z = torch.randn(2, 3, 12, dtype=F64), torch.randn(2, 3, 12, dtype=F64)
    w = torch.randn(12, dtype=F64)
    gs = 12 if group_size is None else group_size
    out = gated_rms_norm(x, w, z, eps=1e-5, group_size=group_size,
                         norm_before_gate=norm_before_gate)
    assert_close_rel(out, _rms_norm_loop(x, w, z, 1e-5, gs, norm_before_gate), 1e-13, "norm")
    norm = GatedRMSNorm(12, eps=1e-5, group_size=group_size, norm_before_gate=norm_before_gate,
                        dtype=F64)
    assert torch.equal(norm.weight, torch.ones(12, dtype=F64))
    assert_close_rel(norm(x, z), _rms_norm_loop(x, norm.weight, z, 1e-5, gs, norm_before_gate),
                     1e-13, "module")
    # without a gate: unit RMS per group
    plain = gated_rms_norm(x, torch.ones(12, dtype=F64), eps=0.0, group_size=gs)
    rms = plain.unflatten(-1, (12 // gs, gs)).square().mean(-1).sqrt()
    assert torch.allclose(rms, torch.ones_like(rms))


# --------------------------------------------------------------------------- precision contract
def test_ops_compute_in_fp32_for_bf16_inputs_and_under_autocast():
    torch.manual_seed(0)
    b, d, n, L = 2, 8, 4, 20
    u = torch.randn(b, d, L).bfloat16()
    delta = torch.randn(b, d, L).bfloat16()
    A = -torch.rand(d, n) - 0.5
    B, C = torch.randn(b, n, L).bfloat16(), torch.randn(b, n, L).bfloat16()
    Dv, z = torch.randn(d), torch.randn(b, d, L).bfloat16()
    low = selective_scan(u, delta, A, B, C, Dv, z, delta_softplus=True)
    assert low.dtype == torch.bfloat16
    high = selective_scan(u.float(), delta.float(), A, B.float(), C.float(), Dv, z.float(),
                          delta_softplus=True)
    assert torch.equal(low, high.bfloat16())  # same fp32 math, rounded once at the end
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = selective_scan(u.float(), delta.float(), A, B.float(), C.float(), Dv, z.float(),
                              delta_softplus=True)
    assert auto.dtype == torch.float32 and torch.equal(auto, high)

    x = torch.randn(b, L, 4, 3).bfloat16()
    dt = torch.randn(b, L, 4).bfloat16()
    Bs, Cs = torch.randn(b, L, 2, 5).bfloat16(), torch.randn(b, L, 2, 5).bfloat16()
    A2 = -torch.rand(4) - 0.5
    low = ssd_chunked(x, dt, A2, Bs, Cs, 8, D=torch.randn(4))
    assert low.dtype == torch.bfloat16
    torch.manual_seed(1)
    D2 = torch.randn(4)
    low = ssd_chunked(x, dt, A2, Bs, Cs, 8, D=D2)
    high = ssd_chunked(x.float(), dt.float(), A2, Bs.float(), Cs.float(), 8, D=D2)
    assert torch.equal(low, high.bfloat16())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = ssd_chunked(x.float(), dt.float(), A2, Bs.float(), Cs.float(), 8, D=D2)
    assert torch.equal(auto, high)


def test_op_gradients_stay_fp32_when_backward_runs_under_autocast():
    torch.manual_seed(0)
    b, L = 2, 19
    scan_in = [torch.randn(b, 6, L), torch.randn(b, 6, L), -torch.rand(6, 3) - 0.5,
               torch.randn(b, 3, L), torch.randn(b, 3, L)]
    ssd_in = [torch.randn(b, L, 4, 3), torch.randn(b, L, 4), -torch.rand(4) - 0.5,
              torch.randn(b, L, 2, 5), torch.randn(b, L, 2, 5)]
    for fn, inputs in ((lambda *a: selective_scan(*a, delta_softplus=True), scan_in),
                       (lambda *a: ssd_chunked(*a, chunk_size=8), ssd_in)):
        leaves = [t.clone().requires_grad_() for t in inputs]
        results = []
        for autocast in (False, True):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                out = fn(*leaves)
                results.append(torch.autograd.grad(out.square().sum(), leaves))
        for g_plain, g_auto in zip(*results):
            assert g_auto.dtype == torch.float32 and torch.equal(g_plain, g_auto)


@pytest.mark.parametrize("cls", ["Mamba", "Mamba2"])
def test_mixer_autocast_and_bf16(cls):
    torch.manual_seed(0)
    m = _small_mixer(cls)
    x = torch.randn(2, 37, 32)
    ref = m(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x)
    assert out.dtype == torch.bfloat16  # like mamba_ssm: out_proj runs in the autocast dtype
    assert torch.isfinite(out).all() and rel_err(out.float(), ref) < 5e-2
    mb = _small_mixer(cls)
    mb.load_state_dict(m.state_dict())
    mb = mb.to(torch.bfloat16)
    outb = mb(x.bfloat16())
    assert outb.dtype == torch.bfloat16 and rel_err(outb.float(), ref) < 5e-2
    outb.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in mb.parameters())


# ---------------------------------------------------------------------------------- mixers
def _small_mixer(cls, **kw):
    if cls == "Mamba":
        return Mamba(d_model=32, d_state=8, **kw)
    return Mamba2(d_model=32, d_state=8, headdim=8, chunk_size=16, **kw)


def _mamba1_slow_path(m: Mamba, hs: torch.Tensor) -> torch.Tensor:
    """mamba_ssm's Mamba.forward without causal_conv1d / fast path, with the sequential scan."""
    L = hs.shape[1]
    xz = (m.in_proj.weight @ hs.reshape(-1, hs.shape[-1]).t()).reshape(-1, hs.shape[0], L)
    xz = xz.permute(1, 0, 2)  # (b, 2*d_inner, l)
    if m.in_proj.bias is not None:
        xz = xz + m.in_proj.bias[:, None]
    A = -torch.exp(m.A_log.float())
    x, z = xz.chunk(2, dim=1)
    x = F.silu(m.conv1d(x)[..., :L])
    x_dbl = m.x_proj(x.transpose(1, 2).reshape(-1, m.d_inner))
    dt, B, C = torch.split(x_dbl, [m.dt_rank, m.d_state, m.d_state], dim=-1)
    dt = (m.dt_proj.weight @ dt.t()).reshape(m.d_inner, -1, L).transpose(0, 1)
    B = B.reshape(-1, L, m.d_state).transpose(1, 2)
    C = C.reshape(-1, L, m.d_state).transpose(1, 2)
    y = selective_scan_sequential(x, dt, A, B, C, m.D.float(), z=z,
                                  delta_bias=m.dt_proj.bias.float(), delta_softplus=True)
    return m.out_proj(y.transpose(1, 2))


def _mamba2_slow_path(m: Mamba2, u: torch.Tensor) -> torch.Tensor:
    """mamba_ssm's Mamba2.forward split path (nn.Conv1d, no kernels), with the sequential SSD."""
    b, L, _ = u.shape
    zxbcdt = m.in_proj(u)
    A = -torch.exp(m.A_log.float())
    gn = m.ngroups * m.d_state
    d_mlp = (zxbcdt.shape[-1] - 2 * m.d_ssm - 2 * gn - m.nheads) // 2
    z0, x0, z, xBC, dt = torch.split(zxbcdt, [d_mlp, d_mlp, m.d_ssm, m.d_ssm + 2 * gn, m.nheads],
                                     dim=-1)
    xBC = F.silu(m.conv1d(xBC.transpose(1, 2)).transpose(1, 2)[:, :-(m.d_conv - 1)])
    x, B, C = torch.split(xBC, [m.d_ssm, gn, gn], dim=-1)
    y = ssd_sequential(
        x.reshape(b, L, m.nheads, m.headdim), dt, A,
        B.reshape(b, L, m.ngroups, m.d_state), C.reshape(b, L, m.ngroups, m.d_state),
        D=m.D.reshape(m.nheads, m.headdim) if m.D_has_hdim else m.D,
        z=None if m.rmsnorm else z.reshape(b, L, m.nheads, m.headdim),
        dt_bias=m.dt_bias, dt_softplus=True, dt_limit=m.dt_limit,
    ).reshape(b, L, m.d_ssm)
    if m.rmsnorm:
        y = _rms_norm_loop(y, m.norm.weight, z, m.norm.eps, m.d_ssm // m.ngroups,
                           m.norm_before_gate)
    if d_mlp > 0:
        y = torch.cat([F.silu(z0) * x0, y], dim=-1)
    return m.out_proj(y)


MIXER_CASES = [
    ("Mamba", dict()),
    ("Mamba", dict(bias=True, conv_bias=False, dt_rank=3, d_conv=3)),
    ("Mamba2", dict()),
    ("Mamba2", dict(ngroups=2, D_has_hdim=True, norm_before_gate=True, bias=True)),
    ("Mamba2", dict(d_ssm=32, rmsnorm=False, dt_limit=(0.01, 0.05))),  # gated-MLP split, no norm
    ("Mamba2", dict(ngroups=2, d_ssm=48, d_conv=2)),
]


@pytest.mark.parametrize("L", [1, 3, 37])
@pytest.mark.parametrize("cls,kw", MIXER_CASES, ids=lambda v: str(v))
def test_mixer_matches_mamba_ssm_slow_path(cls, kw, L):
    torch.manual_seed(0)
    m = _small_mixer(cls, dtype=F64, **kw)
    with torch.no_grad():  # make the optional parts non-trivial
        for name, p in m.named_parameters():
            if name.endswith(("proj.bias", "conv1d.bias", "norm.weight")) and name != "dt_proj.bias":
                p.normal_()
            if name == "D":
                p.normal_()
    x = torch.randn(2, L, 32, dtype=F64, requires_grad=True)
    out = m(x)
    ref = (_mamba1_slow_path if cls == "Mamba" else _mamba2_slow_path)(m, x)
    assert out.shape == (2, L, 32) and out.dtype == F64
    assert_close_rel(out, ref, 1e-10, "mixer output")
    go = torch.randn_like(out)
    params = [p for p in m.parameters()]
    g_out = grads(out, [x, *params], go)
    g_ref = grads(ref, [x, *params], go)
    for (name, _), a, b in zip([("input", None), *m.named_parameters()], g_out, g_ref):
        assert_close_rel(a, b, 1e-9, f"grad {name}")


DOCS = [1, 2, 3, 58, 200]  # with chunk_size=64 the 200-token document starts on a chunk boundary


@pytest.mark.parametrize("cls", ["Mamba", "Mamba2"])
def test_mixer_seq_idx_equals_per_document_runs(cls):
    torch.manual_seed(0)
    if cls == "Mamba":
        m = Mamba(d_model=16, d_state=4, dtype=F64)
    else:
        m = Mamba2(d_model=16, d_state=8, headdim=8, ngroups=2, chunk_size=64, dtype=F64)
    rows = [DOCS, DOCS[::-1]]  # row 0: doc boundary after position 0; row 1: at the last position
    L = sum(DOCS)
    x = torch.randn(2, L, 16, dtype=F64, requires_grad=True)
    seq_idx = torch.stack([doc_seq_idx(r) for r in rows])
    packed = m(x, seq_idx=seq_idx)
    go = torch.randn_like(packed)
    (gx_packed,) = grads(packed, [x], go)

    for r, lengths in enumerate(rows):
        offs = 0
        for n in lengths:
            xs = x[r:r + 1, offs:offs + n].detach().requires_grad_()
            single = m(xs)
            assert_close_rel(packed[r:r + 1, offs:offs + n], single, 1e-10,
                             f"row {r} doc of length {n}")
            (gx,) = grads(single, [xs], go[r:r + 1, offs:offs + n])
            assert_close_rel(gx_packed[r:r + 1, offs:offs + n], gx, 1e-10,
                             f"input grad, row {r} doc of length {n}")
            offs += n
    # the same packed batch without seq_idx leaks state across documents (the test can fail)
    assert rel_err(m(x), packed) > 1e-3


# ----------------------------------------------------------------------------- layout and init
MAMBA1_130M = [
    ("in_proj.weight", (3072, 768)),
    ("conv1d.weight", (1536, 1, 4)),
    ("conv1d.bias", (1536,)),
    ("x_proj.weight", (80, 1536)),
    ("dt_proj.weight", (1536, 48)),
    ("dt_proj.bias", (1536,)),
    ("A_log", (1536, 16)),
    ("D", (1536,)),
    ("out_proj.weight", (768, 1536)),
]
MAMBA2_130M = [
    ("dt_bias", (24,)),
    ("A_log", (24,)),
    ("D", (24,)),
    ("in_proj.weight", (3352, 768)),
    ("conv1d.weight", (1792, 1, 4)),
    ("conv1d.bias", (1792,)),
    ("norm.weight", (1536,)),
    ("out_proj.weight", (768, 1536)),
]


def _shapes(m):
    return sorted((k, tuple(v.shape)) for k, v in m.state_dict().items())


def test_parameter_layout_matches_mamba_ssm_130m():
    m1 = Mamba(d_model=768, d_state=16, device="meta")
    assert _shapes(m1) == sorted(MAMBA1_130M)
    m2 = Mamba2(d_model=768, d_state=128, headdim=64, expand=2, device="meta")
    assert _shapes(m2) == sorted(MAMBA2_130M)
    assert isinstance(m1.dt_proj, DeltaProjection) and not isinstance(m1.dt_proj, nn.Linear)
    # dtypes as in mamba_ssm: Mamba-1 A_log/D fp32; Mamba-2 D fp32, A_log/dt_bias in `dtype`
    m1b = Mamba(d_model=32, dtype=torch.bfloat16)
    assert m1b.A_log.dtype == m1b.D.dtype == torch.float32
    assert m1b.in_proj.weight.dtype == m1b.dt_proj.bias.dtype == torch.bfloat16
    m2b = Mamba2(d_model=32, headdim=16, d_state=8, dtype=torch.bfloat16)
    assert m2b.D.dtype == torch.float32
    assert m2b.A_log.dtype == m2b.dt_bias.dtype == m2b.norm.weight.dtype == torch.bfloat16
    # the d_ssm < d_inner variant keeps the in_proj width 2*d_inner + 2*ngroups*d_state + nheads
    m2s = Mamba2(d_model=32, headdim=8, d_state=4, d_ssm=16, ngroups=2, D_has_hdim=True,
                 device="meta")
    assert dict(_shapes(m2s))["in_proj.weight"] == (2 * 64 + 2 * 2 * 4 + 2, 32)
    assert dict(_shapes(m2s))["conv1d.weight"] == (16 + 16, 1, 4)
    assert dict(_shapes(m2s))["D"] == (16,) and m2s.norm.group_size == 8
    with pytest.raises(NotImplementedError):
        Mamba2(d_model=32, headdim=16, process_group=object())


@pytest.mark.parametrize("cls", ["Mamba", "Mamba2"])
def test_fresh_mixer_passes_ssm_init_check(cls):
    torch.manual_seed(0)
    m = Mamba(d_model=64) if cls == "Mamba" else Mamba2(d_model=64, headdim=16, d_state=16)
    assert m.ssm_init.dt_min == 0.001 and m.ssm_init.dt_max == 0.1
    assert check_ssm_init(nn.ModuleDict({"mixer": m})) == 1
    if cls == "Mamba":
        assert torch.equal(m.A_log, torch.log(torch.arange(1, 17.0)).expand(128, 16))
    # a generic init hook that zeroes the Δ bias is caught
    with torch.no_grad():
        (m.dt_proj.bias if cls == "Mamba" else m.dt_bias).zero_()
    with pytest.raises(SSMInitError):
        check_ssm_init(nn.ModuleDict({"mixer": m}))
    m.reset_parameters()
    assert check_ssm_init(nn.ModuleDict({"mixer": m})) == 1


@pytest.mark.parametrize("cls", ["Mamba", "Mamba2"])
def test_meta_build_then_materialise_and_init(cls):
    kw = dict(dt_min=0.01, dt_max=0.05, dt_init_floor=1e-3)
    if cls == "Mamba":
        m = Mamba(d_model=64, dt_scale=0.5, device="meta", **kw)
    else:
        m = Mamba2(d_model=64, headdim=16, d_state=16, A_init_range=(2, 4), device="meta", **kw)
    assert all(p.is_meta for p in m.parameters())
    m.to_empty(device="cpu")
    with torch.no_grad():
        for p in m.parameters():
            p.fill_(float("nan"))
    container = nn.ModuleDict({"mixer": m})
    init_weights(container, n_layer=1)
    assert check_ssm_init(container) == 1
    assert all(torch.isfinite(p).all() for p in m.parameters())
    dt = F.softplus(m.dt_proj.bias if cls == "Mamba" else m.dt_bias)
    assert dt.min() >= 0.01 * 0.999 and dt.max() <= 0.05 * 1.001
    if cls == "Mamba2":
        assert torch.equal(m.norm.weight, torch.ones_like(m.norm.weight))
        a = torch.exp(m.A_log)
        assert a.min() >= 2 * 0.999 and a.max() <= 4 * 1.001
    else:
        assert m.dt_proj.weight.abs().max() <= 0.5 * m.dt_rank**-0.5
    out = m(torch.randn(1, 5, 64))
    assert out.shape == (1, 5, 64) and torch.isfinite(out).all()
