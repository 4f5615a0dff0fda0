"""models/norm_backward.py against mamba_ssm's own norm backward kernels on the GPU: the same
gradients up to the order of fp32 additions (bf16 outputs within one rounding), for the shapes the
mixers use (Mamba-2's gated norm with dz and the recomputed output written into wider buffers,
grouped norms, the fp32 residual stream's add + norm), row counts no grid divides, and a whole
fused model trained through mamba_ssm's autograd functions with the kernel installed."""

import pytest
import torch

from mamba_train.models import norm_backward


@pytest.fixture(autouse=True)
def upstream_launchers():
    from mamba_ssm.ops.triton import layer_norm, layernorm_gated
    norm_backward.uninstall()
    norm_backward._UPSTREAM.update(gated=layernorm_gated._layer_norm_bwd, add_norm=layer_norm._layer_norm_bwd)
    yield layernorm_gated._layer_norm_bwd, layer_norm._layer_norm_bwd


def _same(ours, ref, dw_index, record, label):
    worst = []
    for i, (a, b) in enumerate(zip(ours, ref)):
        if a is None or b is None:
            assert a is None and b is None, f"{label}: output {i} present in one kernel only"
            continue
        assert a.dtype == b.dtype and a.shape == b.shape, (label, i)
        diff = (a.float() - b.float()).abs().max().item()
        scale = b.float().abs().max().item()
        if i == dw_index:  # fp32 sums over all rows, in another order
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        else:  # per-row fp32 maths, so at most one rounding of the stored dtype apart
            ulp = 2 ** -7 if a.dtype == torch.bfloat16 else 1e-5
            assert diff <= ulp * scale, f"{label}: output {i} differs by {diff:.3e} (scale {scale:.3e})"
        worst.append(f"out{i} {diff / max(scale, 1e-30):.1e}")
    record(f"norm_backward {label}: max |diff| / max |mamba_ssm| " + ", ".join(worst))


@pytest.mark.parametrize("groups,recompute,pps", [(1, True, 4), (1, False, 3), (4, True, 8)])
def test_gated_norm_bwd_matches_mamba_ssm(upstream_launchers, record, monkeypatch, groups, recompute, pps):
    from mamba_ssm.ops.triton import layernorm_gated as g
    upstream = upstream_launchers[0]
    monkeypatch.setattr(norm_backward, "programs_per_sm", pps)
    torch.manual_seed(0)
    M, N = 4099, 2048  # a row count no grid divides
    bf = dict(device="cuda", dtype=torch.bfloat16)
    x, dy = torch.randn(M, N, **bf), torch.randn(M, N, **bf)
    wide = torch.randn(M, N + 640, **bf)  # z and dz as column slices, as the mixer passes them
    z = wide[:, 320:320 + N]
    w = torch.rand(N, device="cuda") + 0.5
    _, _, rstd = g._layer_norm_fwd(x, w, None, 1e-5, z=z, group_size=N // groups,
                                   norm_before_gate=False, is_rms_norm=True)
    outs = []
    for fn in (norm_backward.gated_norm_bwd, upstream):
        dz = torch.zeros(M, N + 640, **bf)[:, 320:320 + N]
        out = torch.zeros(M, N + 64, **bf)[:, 64:] if recompute else None
        got = fn(dy, x, w, None, 1e-5, None, rstd, z, group_size=N // groups, norm_before_gate=False,
                 is_rms_norm=True, recompute_output=recompute, dz=dz, out=out)
        assert got[3].data_ptr() == dz.data_ptr() and (not recompute or got[4].data_ptr() == out.data_ptr())
        outs.append(got)
    _same(outs[0], outs[1], 1, record, f"gated groups={groups} recompute={recompute} pps={pps}")


@pytest.mark.parametrize("residual", [True, False])
def test_add_norm_bwd_matches_mamba_ssm(upstream_launchers, record, residual):
    from mamba_ssm.ops.triton import layer_norm as ln
    upstream = upstream_launchers[1]
    torch.manual_seed(0)
    M, N = 5000, 1024
    h = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    res = torch.randn(M, N, device="cuda") if residual else None
    w = torch.rand(N, device="cuda") + 0.5
    out = ln._layer_norm_fwd(h, w, None, 1e-5, residual=res, out_dtype=torch.bfloat16,
                             residual_dtype=torch.float32, is_rms_norm=True)
    mean, rstd, x = out[2], out[3], out[4]
    dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    dres = torch.randn(M, N, device="cuda")
    args = (dy, x, w, None, 1e-5, mean, rstd, dres)
    kw = dict(has_residual=residual, is_rms_norm=True, x_dtype=torch.bfloat16)
    _same(norm_backward.add_norm_bwd(*args, **kw), upstream(*args, **kw), 1, record,
          f"add_norm residual={residual}")


def test_installed_launch_trains_a_fused_model_like_mamba_ssms(record):
    """A whole fused Mamba-2 model (gated norm inside the mem-efficient mixer, add + norm between
    blocks) with and without the launcher: the same gradients."""
    from mamba_train import MambaLMConfig, build_model
    cfg = MambaLMConfig(d_model=256, n_layer=2, vocab_size=512,
                        ssm_cfg={"layer": "Mamba2", "d_state": 64, "headdim": 32})
    torch.manual_seed(0)
    model = build_model(cfg, backend="fused", device="cuda")
    tokens = torch.randint(0, 512, (2, 1025), device="cuda")
    grads = []
    for install in (False, True):  # set after the build, so each arm runs what it says
        norm_backward.install() if install else norm_backward.uninstall()
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(tokens[:, :-1], labels=tokens[:, 1:]).loss
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert norm_backward.installed()
    worst = max(rel(grads[1][n], g0) for n, g0 in grads[0].items())
    # bf16 outputs a rounding apart can flip later bf16 roundings, so single elements move;
    # the gradients as a whole must not
    assert worst < 2e-3, {n: rel(grads[1][n], g0) for n, g0 in grads[0].items()}
    record(f"norm_backward whole fused Mamba-2 model: worst grad |diff| / |grad| {worst:.2e}")


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30)).item()


def test_mamba3_shapes_and_delegation(upstream_launchers, record):
    """Mamba-3's B/C norms (d_state wide, no gate) run on the kernel; the gate-after-norm form
    (Mamba-3's output norm) goes to mamba_ssm's own kernel, untouched."""
    from mamba_ssm.ops.triton import layernorm_gated as g
    upstream = upstream_launchers[0]
    torch.manual_seed(0)
    M, N = 20000, 128
    bf = dict(device="cuda", dtype=torch.bfloat16)
    x, dy, z = (torch.randn(M, N, **bf) for _ in range(3))
    w = torch.rand(N, device="cuda") + 0.5
    _, _, rstd = g._layer_norm_fwd(x, w, None, 1e-5, is_rms_norm=True)
    args = (dy, x, w, None, 1e-5, None, rstd)
    _same(norm_backward.gated_norm_bwd(*args, is_rms_norm=True), upstream(*args, is_rms_norm=True),
          1, record, "ungated N=128 (Mamba-3 B/C norm)")
    _, _, rstd = g._layer_norm_fwd(x, w, None, 1e-5, z=z, group_size=64, norm_before_gate=True,
                                   is_rms_norm=True)
    kw = dict(z=z, group_size=64, norm_before_gate=True, is_rms_norm=True)
    for a, b in zip(norm_backward.gated_norm_bwd(dy, x, w, None, 1e-5, None, rstd, **kw),
                    upstream(dy, x, w, None, 1e-5, None, rstd, **kw)):
        assert (a is None and b is None) or torch.equal(a, b)
