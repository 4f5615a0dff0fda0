"""``kernels.ssd=mamba_train`` (models/ssd.py, models/ssd_split.py) against mamba_ssm's
own Functions on the GPU: the same kernels on the same inputs, so values and gradients must be
equal bit for bit (bf16 and fp32; lengths a multiple of the chunk and not; document boundaries;
initial and final states; the z gate; grouped B/C), in a whole fused model too, deterministic
across runs, and unchanged when the step is captured in a CUDA graph. With the fused d(CB)/dA
kernels (models/ssd_bwd_kernel.py, models/ssd_bwd_fused.py, ``ssd.fused_kernels``) the fp32 sums
run in another order: the kernels against mamba_ssm's, and the gradients, within fp32 / bf16
rounding.

Bit for bit needs mamba_ssm's deterministic mode (``mamba_ssm/utils/determinism.py``; the
``mamba_deterministic`` fixture). By default mamba_ssm reduces some gradients with ``tl.atomic_add``
in an order that changes from run to run: ``_chunk_cumsum_bwd`` adds one partial dA and one
partial d(dt_bias) per (batch, chunk) program; ``_chunk_state_bwd_db`` / ``_chunk_scan_bwd_dC`` add
the d(dA_cumsum) tiles (so dΔ, dA, d(dt_bias)); ``_chunk_scan_chunk_state_bwd_dx`` adds dΔ tiles and,
for a per-head D, dD tiles. Both sides call these same functions, so in the default mode two
mamba_ssm runs differ from each other there as much as ours does from mamba_ssm's:
``test_atomic_reductions_within_mamba_ssms_own_run_to_run_spread`` checks exactly that."""

import pytest
import torch

from mamba_train.models import ssd, ssd_bwd_fused, ssd_bwd_kernel
from mamba_train.models.ssd import ssd_chunk_scan
from mamba_train.models.ssd_split import split_conv1d_scan_kept

DEV = "cuda"
# gradients mamba_ssm's default mode sums with atomics (see the module docstring)
ATOMIC = {"dt", "A", "dt_bias"}


@pytest.fixture(autouse=True)
def mamba_deterministic(monkeypatch):
    """mamba_ssm's deterministic mode: its atomics become per-tile stores summed by torch in a
    fixed order, in its Functions and in ours alike (ours call the same kernels)."""
    determinism = pytest.importorskip("mamba_ssm.utils.determinism")
    monkeypatch.setattr(determinism, "_deterministic_override", True)
    return determinism


def _seq_idx(batch, length, cuts=(0.3, 0.71)):
    pos = torch.arange(length, device=DEV)
    idx = sum((pos >= int(c * length)).int() for c in cuts)
    return idx.expand(batch, length).to(torch.int32).contiguous()


def _grads_of(fn, leaves):
    """Outputs and input gradients of fn(*leaves) for fixed random output gradients."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in leaves]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    gen = torch.Generator(device=DEV).manual_seed(1)
    loss = sum((o.float() * torch.randn(o.shape, device=DEV, generator=gen)).sum() for o in outs)
    loss.backward()
    return [o.detach() for o in outs] + [t.grad for t in leaves if t is not None]


@pytest.fixture(params=ssd.FUSED_CHOICES)
def fused(request, monkeypatch):
    """ssd.fused_kernels: mamba_ssm's backward kernels, or two / three of them as one of ours."""
    monkeypatch.setattr(ssd, "fused_kernels", request.param)
    return request.param != "none"


def _assert_equal(ours, ref, names, record, label, fused=False, bf16=True):
    """Bit for bit (both sides in mamba_ssm's deterministic mode); with the fused kernel, within
    ``1e-2`` (bf16 activations: a sum order change can flip one bf16 rounding, which then
    propagates) or ``1e-4`` (fp32) of each tensor's largest value."""
    assert len(ours) == len(ref)
    worst = 0.0
    for name, a, b in zip(names, ours, ref):
        assert a.dtype == b.dtype and a.shape == b.shape, (label, name)
        if torch.equal(a, b):
            continue
        diff = (a.float() - b.float()).abs().max().item()
        rel = diff / max(b.float().abs().max().item(), 1e-30)
        worst = max(worst, rel)
        if not fused or rel > (1e-2 if bf16 else 1e-4):
            raise AssertionError(f"{label}: {name} differs from mamba_ssm's by {diff:.3e} "
                                 f"({rel:.2e} of its largest value)")
    how = f"worst rel diff {worst:.1e}" if fused else "bit-identical"
    record(f"kernels.ssd=mamba_train fused={ssd.fused_kernels} {label}: {how} to mamba_ssm "
           f"({len(names)} tensors)")


CHUNK_CASES = [  # (dtype, length, ngroups, seq_idx, h0, z): what distinguishes the kernels' paths
    (torch.bfloat16, 2048, 1, False, False, False),
    (torch.bfloat16, 2000, 2, True, True, True),
    (torch.float32, 2048, 1, False, False, False)]
CHUNK_SWEEP = [(dtype, *shape) for dtype in (torch.bfloat16, torch.float32) for shape in [
    (2048, 1, False, False, False), (2000, 1, True, False, False), (2000, 2, False, True, True),
    (2048, 1, True, True, False)]]


def _chunk_scan_case(dtype, length, ngroups, seq, init, gate):
    """Inputs, names and a runner for ours / mamba_ssm's chunk scan on one case."""
    torch.manual_seed(0)
    b, h, p, n, cs = 2, 8, 64, 128, 256
    t = lambda *s: torch.randn(*s, device=DEV, dtype=dtype)  # noqa: E731
    x, dt, B, C = t(b, length, h, p), t(b, length, h), t(b, length, ngroups, n), t(b, length, ngroups, n)
    A = -torch.rand(h, device=DEV) - 0.5
    D, bias = torch.randn(h, p, device=DEV), torch.randn(h, device=DEV)
    z = t(b, length, h, p) if gate else None
    h0 = torch.randn(b, h, p, n, device=DEV) if init else None
    seq_idx = _seq_idx(b, length) if seq else None

    def run(fn):
        return lambda x, dt, A, B, C, D, z, bias, h0: fn(
            x, dt, A, B, C, cs, D=D, z=z, dt_bias=bias, initial_states=h0, seq_idx=seq_idx,
            dt_softplus=True, return_final_states=True)
    leaves = [x, dt, A, B, C, D, z, bias, h0]
    names = ["out", "final_states"] + [k for k, v in zip("x dt A B C D z dt_bias h0".split(), leaves)
                                       if v is not None]
    label = f"chunk scan {dtype} L={length} groups={ngroups} seq_idx={seq} h0={init} z={gate}"
    return run, leaves, names, label


def _check_chunk_scan(record, fused, case):
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    run, leaves, names, label = _chunk_scan_case(*case)
    _assert_equal(_grads_of(run(ssd_chunk_scan), leaves),
                  _grads_of(run(mamba_chunk_scan_combined), leaves), names, record, label,
                  fused, bf16=case[0] == torch.bfloat16)


@pytest.mark.parametrize("case", CHUNK_CASES, ids=lambda c: f"{c[0]}-L{c[1]}-g{c[2]}-extras{c[3]}")
def test_chunk_scan_matches_mamba_ssm(record, fused, case):
    _check_chunk_scan(record, fused, case)


@pytest.mark.slow
@pytest.mark.parametrize("case", CHUNK_SWEEP, ids=lambda c: "-".join(map(str, c)))
def test_chunk_scan_matches_mamba_ssm_sweep(record, fused, case):
    _check_chunk_scan(record, fused, case)


def test_atomic_reductions_within_mamba_ssms_own_run_to_run_spread(record, mamba_deterministic,
                                                                  monkeypatch):
    """mamba_ssm's default mode (atomics): every gradient but the atomically reduced ones
    (``ATOMIC``) is still bit-identical; those are no further from mamba_ssm's than a second
    mamba_ssm run is, up to a floor for the runs whose atomics happened to land in one order:
    an fp32 sum of k partials in two orders differs by at most about k·2⁻²⁴ of the partials'
    magnitude, with k = batch·nchunks here (the most partials any of these atomics adds)."""
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    mamba_deterministic.set_deterministic_mode(False)  # the fixture's monkeypatch restores it
    monkeypatch.setattr(ssd, "fused_kernels", "none")  # mamba_ssm's kernels only
    case = (torch.bfloat16, 2048, 1, False, False, False)
    run, leaves, names, label = _chunk_scan_case(*case)
    ours = _grads_of(run(ssd_chunk_scan), leaves)
    ref, ref2 = (_grads_of(run(mamba_chunk_scan_combined), leaves) for _ in range(2))
    k = 2 * -(-case[1] // 256)
    worst = {}
    for name, a, r, r2 in zip(names, ours, ref, ref2):
        if name not in ATOMIC:
            assert torch.equal(a, r), f"{label}: {name} differs from mamba_ssm's (no atomics there)"
            continue
        diff = (a.float() - r.float()).abs().max().item()
        spread = (r2.float() - r.float()).abs().max().item()
        floor = k * 2.0 ** -24 * r.float().abs().max().item()
        worst[name] = (diff, spread)
        assert diff <= max(2 * spread, floor), (
            f"{label}: {name} differs from mamba_ssm's by {diff:.3e}; two mamba_ssm runs by "
            f"{spread:.3e}; fp32 order floor {floor:.3e}")
    record(f"kernels.ssd=mamba_train default (atomic) mode {label}: bit-identical but for "
           + ", ".join(f"{n} {d:.1e} (mamba_ssm vs itself {s:.1e})" for n, (d, s) in worst.items()))


def _split_inputs(length, d_nonssm=0, ngroups=1, h=8, p=64, n=128, out_dim=256):
    torch.manual_seed(0)
    dim, chans = h * p, h * p + 2 * ngroups * n
    bf = dict(device=DEV, dtype=torch.bfloat16)
    return dict(zxbcdt=torch.randn(2, length, 2 * d_nonssm + 2 * dim + 2 * ngroups * n + h, **bf),
                w=torch.randn(chans, 4, device=DEV) * 0.3, bias=torch.randn(chans, device=DEV) * 0.1,
                dt_bias=torch.randn(h, device=DEV), A=-torch.rand(h, device=DEV) - 0.5,
                D=torch.randn(h, device=DEV), norm_w=torch.rand(dim, device=DEV) + 0.5,
                out_w=torch.randn(out_dim, d_nonssm + dim, device=DEV) * 0.05), dict(headdim=p, ngroups=ngroups)


@pytest.mark.parametrize("length,d_nonssm,ngroups,seq,rmsnorm", [
    (2048, 0, 1, False, True), (2000, 64, 2, True, True),
    pytest.param(2000, 0, 1, True, True, marks=pytest.mark.slow),
    pytest.param(2048, 0, 1, False, False, marks=pytest.mark.slow)])
def test_split_conv1d_scan_matches_mamba_ssm(record, fused, length, d_nonssm, ngroups, seq, rmsnorm):
    from mamba_ssm.ops.triton.ssd_combined import mamba_split_conv1d_scan_combined
    inputs, kw = _split_inputs(length, d_nonssm, ngroups)
    seq_idx = _seq_idx(2, length) if seq else None
    if not rmsnorm:
        inputs.pop("norm_w")

    def run(fn):
        def call(zxbcdt, w, bias, dt_bias, A, D, norm_w=None, out_w=None):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return fn(zxbcdt, w, bias, dt_bias, A, D, 256, seq_idx=seq_idx, rmsnorm_weight=norm_w,
                          rmsnorm_eps=1e-5, outproj_weight=out_w, norm_before_gate=False, **kw)
        return lambda *a: call(**dict(zip(inputs, a)))
    leaves = list(inputs.values())
    _assert_equal(_grads_of(run(split_conv1d_scan_kept), leaves),
                  _grads_of(run(mamba_split_conv1d_scan_combined), leaves), ["out", *inputs], record,
                  f"split conv1d scan L={length} d_nonssm={d_nonssm} groups={ngroups} seq_idx={seq} "
                  f"rmsnorm={rmsnorm}", fused)


def _model_grads(kernel, seq_idx=None, deterministic=False, backend="fused", bf16=True):
    from mamba_train import MambaLMConfig
    from mamba_train.models.build import build_model
    from mamba_train.models.fused import set_ssd_kernel
    from mamba_train.models.lm import MambaLM
    torch.manual_seed(0)
    cfg = MambaLMConfig(d_model=256, n_layer=2, vocab_size=512, ssm_cfg={"layer": "Mamba2"})
    model = build_model(cfg, backend="fused", device=DEV)
    set_ssd_kernel(model, kernel)
    if backend == "reference":  # the same weights in the fp32 PyTorch reference mixers
        ref = MambaLM(cfg, backend="reference", device=DEV)
        ref.load_state_dict(model.state_dict())
        model = ref
    ids = torch.randint(0, 512, (2, 2000), device=DEV, generator=torch.Generator(DEV).manual_seed(3))
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            logits = model(ids, seq_idx=seq_idx).logits
        logits.float().square().mean().backward()
    finally:
        torch.use_deterministic_algorithms(False)
    return [logits.detach()] + [p.grad for p in model.parameters()]


@pytest.mark.parametrize("seq", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_fused_model_matches_mamba_ssm_kernel_choice(record, fused, seq):
    seq_idx = _seq_idx(2, 2000) if seq else None
    ours, ref = _model_grads("mamba_train", seq_idx), _model_grads("mamba_ssm", seq_idx)
    _assert_equal(ours, ref, [f"t{i}" for i in range(len(ref))], record,
                  f"fused mamba2 model, logits and every parameter gradient, seq_idx={seq}", fused)


def test_fused_model_matches_fp32_reference(record, fused):
    seq_idx = _seq_idx(2, 2000)
    ours = _model_grads("mamba_train", seq_idx, bf16=False)
    ref = _model_grads("mamba_train", seq_idx, backend="reference", bf16=False)
    errs = [((a - b).norm() / b.norm().clamp(min=1e-12)).item() for a, b in zip(ours, ref)]
    record(f"kernels.ssd=mamba_train fused={ssd.fused_kernels} vs fp32 reference (logits, grads): "
           f"worst rel err {max(errs):.2e}")
    assert max(errs) < 1e-3, errs


def test_deterministic_mode_repeats_bit_for_bit(record, fused):
    a, b = _model_grads("mamba_train", deterministic=True), _model_grads("mamba_train", deterministic=True)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    record(f"kernels.ssd=mamba_train fused={ssd.fused_kernels}: two deterministic-mode runs bit-identical")


def test_captured_forward_backward_replays_eagers_result(record, fused):
    inputs, kw = _split_inputs(2000)
    static = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
    dout = torch.randn(2, 2000, 256, device=DEV, dtype=torch.bfloat16)

    def step():
        for v in static.values():
            v.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = split_conv1d_scan_kept(static["zxbcdt"], static["w"], static["bias"],
                                         static["dt_bias"], static["A"], static["D"], 256,
                                         rmsnorm_weight=static["norm_w"], rmsnorm_eps=1e-5,
                                         outproj_weight=static["out_w"], norm_before_gate=False, **kw)
        out.backward(dout)
        return out.detach()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # autotuning and allocations before capture
        for _ in range(2):
            eager = step()
        eager_grads = [v.grad.clone() for v in static.values()]
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    for v in static.values():
        v.grad = None
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager)
    assert all(torch.equal(v.grad, g) for v, g in zip(static.values(), eager_grads))
    record(f"kernels.ssd=mamba_train fused={ssd.fused_kernels}: captured fwd+bwd replay bit-identical "
           "to eager")


def _backward_kernel_inputs(length, ngroups):
    """Seeded shapes (batch, heads, headdim, d_state, chunk) and bf16 x, dout, B, C of the
    backward-kernel tests; each test draws its remaining inputs after these."""
    torch.manual_seed(0)
    b, h, p, n, cs = 8, 32, 64, 128, 256
    bf = dict(device=DEV, dtype=torch.bfloat16)
    x, dout = torch.randn(b, length, h, p, **bf), torch.randn(b, length, h, p, **bf)
    B, C = torch.randn(b, length, ngroups, n, **bf), torch.randn(b, length, ngroups, n, **bf)
    return (b, h, p, n, cs), bf, (x, dout, B, C)


@pytest.mark.parametrize("length,ngroups,seq,block_m", [
    (2048, 1, False, 32), (2000, 2, True, 32),
    pytest.param(2000, 1, True, 64, marks=pytest.mark.slow),
    pytest.param(2048, 1, False, 16, marks=pytest.mark.slow)])
def test_dcb_ddA_kernel_matches_mamba_ssm_kernels(record, monkeypatch, length, ngroups, seq, block_m):
    from mamba_ssm.ops.triton import ssd_chunk_scan as up
    from mamba_ssm.ops.triton.ssd_bmm import _bmm_chunk_fwd
    from mamba_ssm.ops.triton.ssd_chunk_state import _chunk_cumsum_fwd
    monkeypatch.setattr(ssd_bwd_kernel, "block_m", block_m)
    (b, h, p, n, cs), bf, (x, dout, B, C) = _backward_kernel_inputs(length, ngroups)
    seq_idx = _seq_idx(b, length) if seq else None
    dA_cumsum, dt = _chunk_cumsum_fwd(torch.randn(b, length, h, **bf), -torch.rand(h, device=DEV) - 0.5,
                                      cs, dt_bias=torch.randn(h, device=DEV), dt_softplus=True)
    CB = _bmm_chunk_fwd(C, B, cs, seq_idx=seq_idx, output_dtype=torch.float32)
    dcb, dda = ssd_bwd_kernel.chunk_scan_bwd_dcb_ddA(x, dt, dA_cumsum, dout, CB, seq_idx=seq_idx)
    ref_dcb = up._chunk_scan_bwd_dcb(x, dt, dA_cumsum, dout, seq_idx=seq_idx, ngroups=ngroups)
    ref_dda = up._chunk_scan_bwd_ddAcs_stable(x, dt, dA_cumsum, dout, CB)
    rel = [((a - r).abs().max() / r.abs().max()).item() for a, r in ((dcb, ref_dcb), (dda, ref_dda))]
    record(f"ssd_bwd_kernel dCB/ddA L={length} groups={ngroups} seq_idx={seq} block_m={block_m}: "
           f"rel diff vs mamba_ssm {rel[0]:.1e} / {rel[1]:.1e}")
    assert dcb.shape == ref_dcb.shape and dda.shape == ref_dda.shape
    assert max(rel) < 1e-5, rel


@pytest.mark.parametrize("length,ngroups,seq,D_hdim,block_n", [
    (2048, 1, False, False, 32), (2000, 2, True, True, 32),
    pytest.param(2000, 1, True, False, 16, marks=pytest.mark.slow),
    pytest.param(2048, 1, False, False, 64, marks=pytest.mark.slow)])
def test_fused_backward_kernel_matches_mamba_ssm_kernels(record, monkeypatch, length, ngroups, seq,
                                                         D_hdim, block_n):
    from mamba_ssm.ops.triton import ssd_chunk_scan as up
    from mamba_ssm.ops.triton.ssd_bmm import _bmm_chunk_fwd
    from mamba_ssm.ops.triton.ssd_chunk_state import _chunk_cumsum_fwd
    from mamba_ssm.ops.triton.ssd_combined import _chunk_scan_chunk_state_bwd_dx
    monkeypatch.setattr(ssd_bwd_fused, "block_n", block_n)
    (b, h, p, n, cs), bf, (x, dout, B, C) = _backward_kernel_inputs(length, ngroups)
    nchunks = -(-length // cs)
    dstates = torch.randn(b, nchunks, h, p, n, **bf)
    D = torch.randn(h, p, device=DEV) if D_hdim else torch.randn(h, device=DEV)
    seq_idx = _seq_idx(b, length) if seq else None
    dA_cumsum, dt = _chunk_cumsum_fwd(torch.randn(b, length, h, **bf), -torch.rand(h, device=DEV) - 0.5,
                                      cs, dt_bias=torch.randn(h, device=DEV), dt_softplus=True)
    CB = _bmm_chunk_fwd(C, B, cs, seq_idx=seq_idx, output_dtype=torch.float32)
    ours = ssd_bwd_fused.chunk_scan_bwd_fused(x, dt, dA_cumsum, B, CB, dout, dstates, D=D,
                                              seq_idx=seq_idx)
    ref = [*_chunk_scan_chunk_state_bwd_dx(x, dt, dA_cumsum, B, CB, dout, dstates, D=D, seq_idx=seq_idx),
           up._chunk_scan_bwd_dcb(x, dt, dA_cumsum, dout, seq_idx=seq_idx, ngroups=ngroups),
           up._chunk_scan_bwd_ddAcs_stable(x, dt, dA_cumsum, dout, CB)]
    names = ["dx", "ddt", "dD", "dCB", "ddA"]
    rel = {k: ((a.float() - r.float()).abs().max() / r.float().abs().max()).item()
           for k, a, r in zip(names, ours, ref)}
    record(f"ssd_bwd_fused L={length} groups={ngroups} seq_idx={seq} D_hdim={D_hdim} "
           f"block_n={block_n}: rel diff vs mamba_ssm " + ", ".join(f"{k} {v:.1e}" for k, v in rel.items()))
    for k, a, r in zip(names, ours, ref):
        assert a.shape == r.shape and a.dtype == r.dtype, k
    # dx is bf16 (one rounding apart where the fp32 sums differ); the rest fp32
    assert rel["dx"] < 2 ** -7 and max(v for k, v in rel.items() if k != "dx") < 1e-4, rel
