"""transformers' hybrid families on the GPU: our fused backend against transformers' own model
(logits and every parameter gradient under bf16 autocast, each no further from transformers'
fp32 step than transformers' bf16 run is), and packed documents through the
varlen flash-attention path (equal to each document alone, and to the dense-mask reference).
GPU only (tests/gpu/run_all.sh); the CPU versions are tests/test_hf_hybrids.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).parents[1]))

from hf_bf16_check import assert_no_further_from_fp32, bf16_errors, rel_err, token_ids  # noqa: E402
from test_hf_hybrids import CASES, make_hf, transformers_training_path_is_its_model  # noqa: E402

from mamba_train.formats.load import load_model  # noqa: E402
from mamba_train.models.attention import CausalSelfAttention  # noqa: E402


@pytest.mark.parametrize("case", sorted(CASES))
def test_fused_under_bf16_autocast_no_further_from_fp32_than_transformers(case, tmp_path, record):
    """Logits and every parameter gradient of our fused model under bf16 autocast, judged like
    transformers' own bf16 run: against transformers' fp32 step (tests/hf_bf16_check.py says
    why; the two bf16 runs round the head's gradient in different places)."""
    hf, src = make_hf(tmp_path, CASES[case])
    # training mode: transformers takes mamba_ssm's fused path too, where that path is its model
    hf = hf.cuda().train(transformers_training_path_is_its_model(CASES[case]))
    ours = load_model(src, backend="fused", device="cuda").train()
    ids = token_ids(hf, 2, 256, "cuda")
    errs = bf16_errors(hf, ours, ids, CASES[case]["model_type"], "cuda")
    # every error goes to the record before the check, so a cut run still says what was off
    for name, (e_ours, e_hf, e_fp32) in sorted(errs.items(), key=lambda kv: -kv[1][0])[:4]:
        record(f"hybrid fused vs transformers {case} {name}: ours bf16 {e_ours:.2e}, "
               f"transformers bf16 {e_hf:.2e}, ours fp32 {e_fp32:.2e}")
    worst = max((e[0], n) for n, e in errs.items())
    ratio, at = assert_no_further_from_fp32(errs)
    record(f"hybrid fused vs transformers {case} under bf16 autocast, against transformers' fp32: "
           f"logits {errs['logits'][0]:.2e} (transformers {errs['logits'][1]:.2e}), worst grad "
           f"{worst[1]} {worst[0]:.2e} (transformers {errs[worst[1]][1]:.2e}); tightest {at} at "
           f"{ratio:.2f} of its bound")


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
