"""``model.ssm_cfg.ssd_kernel=mamba_train`` (models/ssd.py, models/ssd_split.py) against mamba_ssm's
own Functions on the GPU: the same kernels on the same inputs, so values and gradients must be
equal bit for bit (bf16 and fp32; lengths a multiple of the chunk and not; document boundaries;
initial and final states; the z gate; grouped B/C), in a whole fused model too, deterministic
across runs, and unchanged when the step is captured in a CUDA graph."""

import pytest
import torch

from mamba_train.models.ssd import ssd_chunk_scan
from mamba_train.models.ssd_split import split_conv1d_scan_kept

DEV = "cuda"


def _seq_idx(batch, length, cuts=(0.3, 0.71)):
    pos = torch.arange(length, device=DEV)
    idx = sum((pos >= int(c * length)).int() for c in cuts)
    return idx.expand(batch, length).to(torch.int32).contiguous()


def _grads_of(fn, leaves, extra_outputs=0):
    """Outputs and input gradients of fn(*leaves) for fixed random output gradients."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in leaves]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    gen = torch.Generator(device=DEV).manual_seed(1)
    loss = sum((o.float() * torch.randn(o.shape, device=DEV, generator=gen)).sum() for o in outs)
    loss.backward()
    return [o.detach() for o in outs] + [t.grad for t in leaves if t is not None]


def _assert_equal(ours, ref, names, record, label):
    assert len(ours) == len(ref)
    for name, a, b in zip(names, ours, ref):
        assert a.dtype == b.dtype and a.shape == b.shape, (label, name)
        if not torch.equal(a, b):
            diff = (a.float() - b.float()).abs().max().item()
            raise AssertionError(f"{label}: {name} differs from mamba_ssm's by {diff:.3e}")
    record(f"ssd_kernel=mamba_train {label}: bit-identical to mamba_ssm ({len(names)} tensors)")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("length,ngroups,seq,init,gate", [
    (2048, 1, False, False, False), (2000, 1, True, False, False), (2000, 2, False, True, True),
    (2048, 1, True, True, False)])
def test_chunk_scan_matches_mamba_ssm(record, dtype, length, ngroups, seq, init, gate):
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
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
    _assert_equal(_grads_of(run(ssd_chunk_scan), leaves),
                  _grads_of(run(mamba_chunk_scan_combined), leaves), names, record,
                  f"chunk scan {dtype} L={length} groups={ngroups} seq_idx={seq} h0={init} z={gate}")


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
    (2048, 0, 1, False, True), (2000, 0, 1, True, True), (2000, 64, 2, True, True),
    (2048, 0, 1, False, False)])
def test_split_conv1d_scan_matches_mamba_ssm(record, length, d_nonssm, ngroups, seq, rmsnorm):
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
                  f"rmsnorm={rmsnorm}")


def _model_grads(kernel, seq_idx=None, deterministic=False, backend="fused", bf16=True):
    from mamba_train import MambaLMConfig
    from mamba_train.models.build import build_model
    from mamba_train.models.lm import MambaLM
    torch.manual_seed(0)
    cfg = MambaLMConfig(d_model=256, n_layer=2, vocab_size=512,
                        ssm_cfg={"layer": "Mamba2", "ssd_kernel": kernel})
    model = build_model(cfg, backend="fused", device=DEV)
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


@pytest.mark.parametrize("seq", [False, True])
def test_fused_model_matches_mamba_ssm_kernel_choice(record, seq):
    seq_idx = _seq_idx(2, 2000) if seq else None
    ours, ref = _model_grads("mamba_train", seq_idx), _model_grads("mamba_ssm", seq_idx)
    _assert_equal(ours, ref, [f"t{i}" for i in range(len(ref))], record,
                  f"fused mamba2 model, logits and every parameter gradient, seq_idx={seq}")


def test_fused_model_matches_fp32_reference(record):
    seq_idx = _seq_idx(2, 2000)
    ours = _model_grads("mamba_train", seq_idx, bf16=False)
    ref = _model_grads("mamba_train", seq_idx, backend="reference", bf16=False)
    errs = [((a - b).norm() / b.norm().clamp(min=1e-12)).item() for a, b in zip(ours, ref)]
    record(f"ssd_kernel=mamba_train vs fp32 reference (logits, grads): worst rel err {max(errs):.2e}")
    assert max(errs) < 1e-3, errs


def test_deterministic_mode_repeats_bit_for_bit(record):
    a, b = _model_grads("mamba_train", deterministic=True), _model_grads("mamba_train", deterministic=True)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    record("ssd_kernel=mamba_train: two deterministic-mode runs bit-identical")


def test_captured_forward_backward_replays_eagers_result(record):
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
    record("ssd_kernel=mamba_train: captured fwd+bwd replay bit-identical to eager")
