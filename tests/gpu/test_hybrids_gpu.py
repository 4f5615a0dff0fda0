"""transformers' hybrid families on the GPU: our fused backend against transformers' own model
(logits and every parameter gradient under bf16 autocast), and packed documents through the
varlen flash-attention path (equal to each document alone, and to the dense-mask reference).
GPU only (tests/gpu/run_all.sh); the CPU versions are tests/test_hf_hybrids.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).parents[1]))

from test_hf_hybrids import CASES, make_hf  # noqa: E402

from mamba_train.formats.load import load_model  # noqa: E402
from mamba_train.formats.hf import FAMILIES  # noqa: E402
from mamba_train.models.attention import CausalSelfAttention  # noqa: E402


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12)).item()


@pytest.mark.parametrize("case", sorted(CASES))
def test_fused_matches_transformers_under_bf16_autocast(case, tmp_path, record):
    hf, src = make_hf(tmp_path, CASES[case])
    hf = hf.cuda().train()  # training mode: transformers takes mamba_ssm's fused path too
    ours = load_model(src, backend="fused", device="cuda").train()
    ids = torch.randint(0, 96, (2, 256), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        want = hf(ids, use_cache=False).logits.float()
        got = ours(ids).logits[..., :96].float()
    logits_err = rel_err(got, want)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        hf(ids, labels=ids, use_cache=False).loss.backward()
        ours(ids, labels=labels).loss.backward()
    family = FAMILIES[CASES[case]["model_type"]]
    grads = {n: p.grad for n, p in ours.named_parameters() if p.grad is not None}
    ours_as_hf = {k: v.cpu() for k, v in family.to_hf(ours.config, grads).items()}
    hf_grads = {n: p.grad for n, p in hf.named_parameters() if p.grad is not None}
    worst = max((rel_err(ours_as_hf[n], g.cpu()), n) for n, g in hf_grads.items() if n in ours_as_hf)
    record(f"hybrid fused vs transformers {case}: logits rel err {logits_err:.2e}, worst grad "
           f"{worst[1]} {worst[0]:.2e}")
    assert logits_err < 2e-2
    assert worst[0] < 5e-2, worst


@pytest.mark.parametrize("heads,kv,rotary", [(4, 4, 0), (8, 2, 32)])
def test_varlen_packed_attention_matches_the_dense_mask_and_documents_alone(heads, kv, rotary):
    torch.manual_seed(0)
    layer = CausalSelfAttention(256, num_heads=heads, num_heads_kv=kv, causal=True,
                                rotary_emb_dim=rotary, qkv_proj_bias=False).cuda()
    lengths = [300, 1, 700, 23]  # one window of 1024; a one-token document
    seq_idx = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None].cuda().int()
    x = torch.randn(1, sum(lengths), 256, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        packed = layer(x, seq_idx=seq_idx)  # varlen flash attention
        alone = torch.cat([layer(part) for part in x.split(lengths, dim=1)], dim=1)
    dense = layer(x, seq_idx=seq_idx)  # fp32, no autocast: the dense-mask reference
    assert rel_err(packed, alone) < 1e-2
    assert rel_err(packed, dense) < 2e-2
    gx, = torch.autograd.grad(packed.float().square().sum(), x)
    gd, = torch.autograd.grad(dense.square().sum(), x)
    assert rel_err(gx, gd) < 3e-2


def test_varlen_attention_memory_is_linear_in_the_sequence():
    """At 32k tokens the dense mask alone would be 1 GiB of booleans per sequence and the fp32
    scores 4 GiB per head; the varlen path's peak stays a few times the activations."""
    layer = CausalSelfAttention(512, num_heads=8, num_heads_kv=2, causal=True).cuda()
    L = 32768
    seq_idx = (torch.arange(L, device="cuda") // 4096)[None].int()
    x = torch.randn(1, L, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        layer(x, seq_idx=seq_idx).float().sum().backward()
    peak = torch.cuda.max_memory_allocated() - base
    assert peak < 64 * L * 512 * 2, f"{peak / 2**20:.0f} MiB"  # far below the L^2 terms
