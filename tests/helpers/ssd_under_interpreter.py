"""Runs ``kernels.ssd=mamba_train``'s Functions (models/ssd.py, models/ssd_split.py) and mamba_ssm's
own on CPU under Triton's interpreter and prints, as JSON, which outputs and gradients differ.

mamba_ssm's kernels run on CPU tensors through tests/helpers/mamba_ssm_on_cpu.py (causal_conv1d
replaced by the same PyTorch conv in both Functions, so the split Function's comparison covers
everything around it).
Needs mamba_ssm's Python sources importable (tests/test_ssd.py skips otherwise)."""

import json

import mamba_ssm_on_cpu  # noqa: F401  (first: the interpreter and mamba_ssm's CPU shims)
import torch  # noqa: E402
from mamba_ssm.ops.triton import ssd_combined  # noqa: E402

from mamba_train.models import ssd  # noqa: E402
from mamba_train.models.ssd import ssd_chunk_scan  # noqa: E402
from mamba_train.models.ssd_split import split_conv1d_scan_kept  # noqa: E402


def compare(ours, theirs, leaves, names, relative=False):
    """Names of the outputs / input gradients that are not bit-identical, with the max diff
    (``relative``: over the largest value of mamba_ssm's)."""
    results = []
    for fn in (ours, theirs):
        copies = [t.clone().requires_grad_() if t is not None else None for t in leaves]
        outs = fn(*copies)
        outs = outs if isinstance(outs, tuple) else (outs,)
        g = torch.Generator().manual_seed(1)
        sum((o.float() * torch.randn(o.shape, generator=g)).sum() for o in outs).backward()
        results.append([o.detach() for o in outs] + [c.grad for c in copies if c is not None])
    assert len(results[0]) == len(names)
    scale = lambda b: b.float().abs().max().item() if relative else 1.0  # noqa: E731
    return {n: (a.float() - b.float()).abs().max().item() / scale(b)
            for n, a, b in zip(names, *results) if not torch.equal(a, b)}


def chunk_scan_case(dtype, relative=False):
    """Length 40 in chunks of 16, document boundaries, initial states, the z gate, 2 groups."""
    g = torch.Generator().manual_seed(0)
    b, l, h, ngroups, p, n = 1, 40, 4, 2, 16, 16
    r = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    leaves = [r(b, l, h, p), r(b, l, h), -torch.rand(h, generator=g) - 0.5, r(b, l, ngroups, n),
              r(b, l, ngroups, n), torch.randn(h, p, generator=g), r(b, l, h, p),
              torch.randn(h, generator=g), torch.randn(b, h, p, n, generator=g)]
    seq_idx = (torch.arange(l) >= 23).int()[None].contiguous()

    def call(fn):
        return lambda x, dt, A, B, C, D, z, bias, h0: fn(
            x, dt, A, B, C, 16, D=D, z=z, dt_bias=bias, initial_states=h0, seq_idx=seq_idx,
            dt_softplus=True, return_final_states=True)
    names = ["out", "final_states", "x", "dt", "A", "B", "C", "D", "z", "dt_bias", "h0"]
    return compare(call(ssd_chunk_scan), call(ssd_combined.mamba_chunk_scan_combined), leaves,
                   names, relative)


def fused_forward_case():
    """chunk_scan_case with models/ssd_fwd_kernel.py's forward (fp32 sums in another order, so
    relative differences, not bit-identity)."""
    ssd.forward_kernels = "fused"
    try:
        return chunk_scan_case(torch.float32, relative=True)
    finally:
        ssd.forward_kernels = "mamba_ssm"


def split_case():
    """The fused mixer body: SwiGLU columns beside the SSD (d_ssm < d_inner), gated RMSNorm,
    out_proj, length 40 in chunks of 16."""
    g = torch.Generator().manual_seed(0)
    l, h, p, n, d_nonssm = 40, 2, 16, 16, 8
    dim, chans = h * p, h * p + 2 * n
    leaves = [torch.randn(1, l, 2 * d_nonssm + 2 * dim + 2 * n + h, generator=g),
              torch.randn(chans, 4, generator=g) * 0.3, torch.randn(chans, generator=g) * 0.1,
              torch.randn(h, generator=g), -torch.rand(h, generator=g) - 0.5,
              torch.randn(h, generator=g), torch.rand(dim, generator=g) + 0.5,
              torch.randn(24, d_nonssm + dim, generator=g) * 0.1]

    def call(fn):
        return lambda zxbcdt, w, bias, dt_bias, A, D, norm_w, out_w: fn(
            zxbcdt, w, bias, dt_bias, A, D, 16, rmsnorm_weight=norm_w, rmsnorm_eps=1e-5,
            outproj_weight=out_w, headdim=p, norm_before_gate=False)
    names = ["out", "zxbcdt", "conv_w", "conv_b", "dt_bias", "A", "D", "norm_w", "out_w"]
    return compare(call(split_conv1d_scan_kept),
                   call(ssd_combined.mamba_split_conv1d_scan_combined), leaves, names)


def mixer_case():
    """models/fused.py's FusedMamba2 with kernels.ssd=mamba_train against kernels.ssd=mamba_ssm
    (mamba_ssm's Mamba2.forward): the hook passes the module's parameters the same way."""
    from mamba_train.models.fused import FusedMamba2, set_ssd_kernel
    u = torch.randn(1, 40, 32, generator=torch.Generator().manual_seed(1))
    results = []
    for kernel in ("mamba_train", "mamba_ssm"):
        torch.manual_seed(0)
        mixer = FusedMamba2(32, d_state=16, headdim=16, chunk_size=16, ngroups=2, d_ssm=32,
                            norm_before_gate=False)
        set_ssd_kernel(mixer, kernel)
        y = mixer(u)
        y.square().mean().backward()
        results.append([y.detach()] + [p.grad for _, p in mixer.named_parameters()])
    names = ["out"] + [n for n, _ in mixer.named_parameters()]
    return {n: (a - b).abs().max().item() for n, a, b in zip(names, *results) if not torch.equal(a, b)}


if __name__ == "__main__":
    # fp32 only: Triton's interpreter (3.9) computes tl.dot on bf16 operands wrongly (both
    # Functions would agree on wrong numbers); bf16 is compared on the GPU
    print(json.dumps({"chunk_scan": chunk_scan_case(torch.float32), "split": split_case(),
                      "mixer": mixer_case(), "fused_forward": fused_forward_case()}))
