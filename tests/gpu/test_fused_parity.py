"""Fused (mamba_ssm kernels) vs reference (pure PyTorch) with identical weights: logits and every
parameter gradient agree, in fp32 and under bf16 autocast, for several shapes including sequence
lengths that are not a multiple of the Mamba-2 chunk size. GPU only (tests/gpu/run_all.sh).

"fp32" means IEEE fp32 in the kernels too: Triton's ``tl.dot`` uses TF32 for fp32 inputs unless
``TRITON_F32_DEFAULT=ieee`` (set by run_all.sh); with TF32 the Mamba-2 SSD gradients of
A_log / Δ bias differ from exact fp32 by ~2e-3 (measured 2026-11-23,
benchmarks/results/2026-11-23-fused-parity.md)."""

import pytest
import torch

from mamba_train import MambaLMConfig, build_model
from mamba_train.models.lm import MambaLM

CONFIGS = {
    "mamba1": dict(d_model=256, n_layer=2, vocab_size=1000, ssm_cfg={"layer": "Mamba1"}),
    "mamba2": dict(d_model=256, n_layer=2, vocab_size=1000,
                   ssm_cfg={"layer": "Mamba2", "d_state": 64, "headdim": 32, "chunk_size": 64}),
    "mamba2_ngroups2": dict(d_model=256, n_layer=2, vocab_size=1000,
                            ssm_cfg={"layer": "Mamba2", "d_state": 32, "headdim": 32,
                                     "chunk_size": 32, "ngroups": 2}),
}
SHAPES = [(2, 200), (1, 1000)]  # not multiples of the chunk size (64 / 32)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12)).item()


def pair(name: str):
    torch.manual_seed(0)
    cfg = MambaLMConfig(**CONFIGS[name])
    fused = build_model(cfg, backend="fused", device="cuda")
    ref = MambaLM(cfg, backend="reference", device="cuda")
    ref.load_state_dict(fused.state_dict())
    return fused, ref


def run(model, x, dtype):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == "bf16"):
        logits = model(x[:, :-1]).logits
    # the training loss (next-token cross-entropy), computed in fp32
    torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten()).backward()
    return logits.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype, tol", [("fp32", 1e-3), ("bf16", 2e-2)])
def test_fused_matches_reference(name, shape, dtype, tol, record):
    fused, ref = pair(name)
    x = torch.randint(0, 1000, shape, device="cuda")
    lf, gf = run(fused, x, dtype)
    lr, gr = run(ref, x, dtype)
    errs = {"logits": rel_err(lf, lr)}
    errs.update({n: rel_err(gf[n], gr[n]) for n in gr})
    worst = max(errs, key=errs.get)
    record(f"parity {name} {shape} {dtype}: logits rel err {errs['logits']:.2e}, "
           f"worst grad {worst} {errs[worst]:.2e} (tol {tol:g})")
    assert errs["logits"] < tol
    assert errs[worst] < tol, (worst, errs[worst])


@pytest.mark.parametrize("layer", ["Mamba2"])
def test_fused_seq_idx_matches_per_document_runs(layer, record):
    """Packed documents with seq_idx == each document run alone (fused Mamba-2 kernels):
    logits, and every parameter gradient of a weighted sum of the logits."""
    torch.manual_seed(0)
    cfg = MambaLMConfig(**CONFIGS["mamba2"])
    model = build_model(cfg, backend="fused", device="cuda")
    lengths = [1, 2, 3, 250, 40]
    x = torch.randint(0, 1000, (1, sum(lengths)), device="cuda")
    weights = torch.randn(1, sum(lengths), model.config.padded_vocab_size, device="cuda")
    seq_idx = torch.cat([torch.full((n,), i, dtype=torch.int32) for i, n in enumerate(lengths)])
    model.zero_grad(set_to_none=True)
    packed = model(x, seq_idx=seq_idx[None].cuda()).logits
    (packed * weights).sum().backward()
    grads_packed = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    parts, start = [], 0
    for n in lengths:
        out = model(x[:, start:start + n]).logits
        (out * weights[:, start:start + n]).sum().backward()
        parts.append(out.detach())
        start += n
    err = rel_err(packed.detach(), torch.cat(parts, dim=1))
    grad_errs = {n: rel_err(grads_packed[n], p.grad) for n, p in model.named_parameters()}
    worst = max(grad_errs, key=grad_errs.get)
    record(f"seq_idx fused {layer}: packed vs per-document logits rel err {err:.2e}, "
           f"worst grad {worst} {grad_errs[worst]:.2e}")
    assert err < 1e-3
    assert grad_errs[worst] < 1e-3, (worst, grad_errs[worst])
