"""A training step's GPU time by kernel family, against the matmul-only lower bound.

``profile_step.py`` collects ms/step per kernel name; this groups the names into the families
that decide what to work on and prints a markdown table (lines prefixed ``BUDGET``) to paste into
a report under ``benchmarks/results/``. The matmul-only bound is ``6 N`` FLOPs per token (``N``: the matmul weights of
``mamba_train.models.flops.matmul_params``, the LM head included) at the dense bf16 peak: the
step time if every GEMM ran at peak and nothing else took any time.

Family sums add kernel durations, so kernels overlapping on two streams count twice; the
``busy`` row is the union of intervals (what the GPU actually spent). Kernel names alone cannot
tell the gated RMSNorm of a Mamba-2 mixer from the residual add + norm between blocks (both are
mamba_ssm's ``_layer_norm_*`` Triton kernels), so they share one family; likewise the in/out
projection GEMMs share one with the LM head's.
"""

from __future__ import annotations

import collections
import re

# first match wins; patterns on the kernel name as CUPTI reports it
FAMILIES: list[tuple[str, str]] = [
    ("Mamba-3 SISO kernels", r"mamba3_siso|angle_dt"),
    ("SSD chunk kernels", r"chunk_scan|chunk_state|state_passing|bmm_chunk|chunk_cumsum|ddAcs"
                          r"|chunk_fwd_kernel|chunk_bwd_kernel|chunk_local_cumsum"),
    ("selective scan", r"selective_scan"),
    ("conv1d", r"conv1d"),
    ("loss", r"cross_entropy|softmax|SoftMax|nll_loss|logsumexp"),
    ("norms (gated + add&norm)", r"layer_norm|rms_norm|rmsnorm|layernorm|_norm_fwd|_norm_bwd"),
    ("GEMM (projections + LM head)", r"gemm|xmma|nvjet|cutlass|cublas|splitKreduce|sm90_|sm80_"
                                     r"|ampere_|Kernel2"),
    ("optimizer + clip", r"multi_tensor_apply|adam|Adam|LpNorm|lpnorm|foreach"),
    ("embedding", r"indexSelect|embedding|index_put|indexing_backward|compute_grad_weight"
                  r"|sum_and_scatter|krn_partial|RadixSort|radix_sort|segment"),
    ("elementwise + copies", r"elementwise|reduce_kernel|Memcpy|Memset|copy|fill|CatArray"
                             r"|where|triu|transpose"),
]
OTHER = "other"
_COMPILED = [(family, re.compile(pattern)) for family, pattern in FAMILIES]


def family_of(kernel_name: str) -> str:
    for family, pattern in _COMPILED:
        if pattern.search(kernel_name):
            return family
    return OTHER


def by_family(by_name: dict[str, float]) -> collections.Counter:
    """ms/step per family from ms/step per kernel name."""
    out = collections.Counter()
    for name, ms in by_name.items():
        out[family_of(name)] += ms
    return out


def matmul_bound_ms(model_name: str, micro_batch: int, seq_len: int, peak: float) -> float:
    from mamba_train.models.flops import matmul_params
    from harness import model_config
    return 6 * matmul_params(model_config(model_name)[0]) * micro_batch * seq_len / peak * 1e3


def budget_table(arms: dict[str, dict], bound_ms: float | None) -> list[str]:
    """Markdown rows: one per family (largest first in the last arm), then busy, wall and the
    matmul-only bound; each cell ``ms (share of busy)``."""
    fams = {label: by_family(r["by_name"]) for label, r in arms.items()}
    last = list(arms)[-1]
    order = [f for f, _ in FAMILIES if any(fams[a][f] for a in arms)]
    order = sorted(order, key=lambda f: -fams[last][f]) + [OTHER]
    rows = ["| family | " + " | ".join(f"{a} ms/step" for a in arms) + " |",
            "|---|" + "---|" * len(arms)]
    for f in order:
        cells = [f"{fams[a][f]:.1f} ({fams[a][f] / arms[a]['busy_ms']:.0%})" for a in arms]
        rows.append(f"| {f} | " + " | ".join(cells) + " |")
    rows.append("| GPU busy (interval union) | " + " | ".join(f"{arms[a]['busy_ms']:.1f}" for a in arms) + " |")
    rows.append("| wall | " + " | ".join(f"{arms[a]['wall_ms']:.1f}" for a in arms) + " |")
    if bound_ms is not None:
        rows.append("| matmul-only bound (6N / peak) | " + " | ".join(
            f"{bound_ms:.1f} ({bound_ms / arms[a]['wall_ms']:.0%} of wall)" for a in arms) + " |")
    return rows


def print_budget(model_name: str, micro_batch: int, arms: dict[str, dict], peak: float | None,
                 seq_len: int = 2048, top_other: int = 5) -> None:
    if not arms:
        return
    if peak is None:
        from harness import peak_bf16_flops
        peak = peak_bf16_flops(None)
    bound = matmul_bound_ms(model_name, micro_batch, seq_len, peak) if peak else None
    peak_note = f"bf16 peak {peak:.3g} FLOP/s" if peak else "no peak FLOP/s known (pass --peak-flops)"
    print(f"-- kernel budget {model_name} mb={micro_batch} (ms/step, share of GPU busy); {peak_note}")
    for row in budget_table(arms, bound):
        print(f"BUDGET {row}")
    for label, r in arms.items():  # what "other" holds, to refine the families
        other = sorted(((ms, n) for n, ms in r["by_name"].items() if family_of(n) == OTHER),
                       reverse=True)[:top_other]
        for ms, name in other:
            print(f"OTHER {label}: {ms:.2f} ms/step {name[:100]}")
