"""Runs models/norm_backward.py's Triton kernel on CPU under Triton's interpreter and prints, as
JSON, its largest differences from autograd through the PyTorch form of each norm.
``TRITON_INTERPRET`` must be set before triton is imported, hence a process of its own
(tests/test_norm_backward.py)."""

import json
import os

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from mamba_train.models import norm_backward  # noqa: E402

EPS = 1e-5


def _err(a, b):
    return (a.float() - b.float()).abs().max().item()


def gated_case(M=37, groups=4, group=24, sms=2):
    """norm(x * silu(z)) per group, dz and the recomputed output written into column slices of
    wider buffers (as Mamba-2's mixer passes them); few programs, so each walks several tiles."""
    g = torch.Generator().manual_seed(0)
    N = groups * group
    x, dy = torch.randn(M, N, generator=g), torch.randn(M, N, generator=g)
    zwide = torch.randn(M, N + 10, generator=g)
    z = zwide[:, 5:5 + N]
    w = torch.rand(N, generator=g) + 0.5
    xr, zr, wr = (t.clone().requires_grad_() for t in (x, z, w))
    gate = (xr * F.silu(zr)).view(M, groups, group)
    rstd = torch.rsqrt(gate.square().mean(-1, keepdim=True) + EPS)
    y = (gate * rstd).view(M, N) * wr
    y.backward(dy)
    dz = torch.zeros(M, N + 10)[:, 3:3 + N]
    out = torch.zeros(M, N + 6)[:, 2:2 + N]
    rstd_flat = rstd.detach().squeeze(-1).t().contiguous().view(-1)  # (groups * M,), group-major
    dx, dw, dz_out, _, y_out = norm_backward.rmsnorm_bwd(dy, x, w, rstd_flat, z=z, group_size=group,
                                                         recompute_output=True, dz=dz, out=out, sms=sms)
    return {"dx": _err(dx, xr.grad), "dz": _err(dz, zr.grad), "dw": _err(dw, wr.grad),
            "y": _err(out, y.detach()), "dz_in_place": dz_out.data_ptr() == dz.data_ptr(),
            "y_in_place": y_out.data_ptr() == out.data_ptr()}


def add_norm_case(M=53, N=40, sms=3):
    """The add + norm between blocks: fp32 residual stream x, bf16 output gradient, the
    residual's own gradient added, dx in bf16 and the fp32 residual gradient stored apart."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(M, N, generator=g)
    dy = torch.randn(M, N, generator=g).to(torch.bfloat16)
    dres = torch.randn(M, N, generator=g)
    w = torch.rand(N, generator=g) + 0.5
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    rstd = torch.rsqrt(xr.square().mean(-1, keepdim=True) + EPS)
    (xr * rstd * wr).backward(dy.float())
    ref_dx = xr.grad + dres
    dx, dw, _, dres_in, _ = norm_backward.rmsnorm_bwd(
        dy, x, w, rstd.detach().view(-1), dresidual=dres, dx_dtype=torch.bfloat16,
        store_dresidual=True, sms=sms)
    adapter = norm_backward.add_norm_bwd(dy, x, w, None, EPS, None, rstd.detach().view(-1), dres,
                                         has_residual=True, is_rms_norm=True, x_dtype=torch.bfloat16)
    return {"dres_in": _err(dres_in, ref_dx),
            "dx_bf16_rel": _err(dx, ref_dx.to(torch.bfloat16)) / ref_dx.abs().max().item(),
            "dx_dtype": str(dx.dtype), "dw": _err(dw, wr.grad),
            "adapter_same": all(torch.equal(a, b) for a, b in zip(adapter[:2], (dx, dw)))
            and torch.equal(adapter[3], dres_in)}


if __name__ == "__main__":
    print(json.dumps({"gated": gated_case(), "gated_one_program": gated_case(M=19, groups=1, group=50, sms=1),
                      "add_norm": add_norm_case()}))
