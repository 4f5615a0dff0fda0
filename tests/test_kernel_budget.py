"""benchmarks/kernel_budget.py: kernel names as CUPTI reports them land in the right family, and
the budget table's rows add up."""

import collections
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from kernel_budget import OTHER, budget_table, by_family, family_of  # noqa: E402


@pytest.mark.parametrize("name, family", [
    ("_chunk_scan_chunk_state_bwd_dx_kernel", "SSD chunk kernels"),
    ("_state_passing_fwd_kernel", "SSD chunk kernels"),
    ("chunk_bwd_kernel_dqkwg", "SSD chunk kernels"),  # fla's simple GLA
    ("mamba3_siso_bwd_kernel_dqkv", "Mamba-3 SISO kernels"),
    ("angle_dt_bwd_kernel", "Mamba-3 SISO kernels"),
    ("void selective_scan_bwd_kernel<Selective_Scan_bwd_kernel_traits<128, 16, true, true>>",
     "selective scan"),
    ("void causal_conv1d_bwd_kernel<Causal_conv1d_bwd_kernel_traits<128, 4, true>>", "conv1d"),
    ("cross_entropy_rows_kernel", "loss"),
    ("void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float, float>", "loss"),
    ("_layer_norm_bwd_kernel", "norms (gated + add&norm)"),
    ("nvjet_tst_192x128_64x4_2x1_v_bz_coopA_TNN", "GEMM (projections + LM head)"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "GEMM (projections + LM head)"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>",
     "optimizer + clip"),
    ("void at::native::(anonymous namespace)::indexSelectLargeIndex<float, long>", "embedding"),
    ("Memcpy DtoD (Device -> Device)", "elementwise + copies"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>",
     "elementwise + copies"),
    ("some_new_kernel", OTHER),
])
def test_family_of(name, family):
    assert family_of(name) == family


def test_budget_table_sums_and_bound():
    by_name = collections.Counter({"_chunk_scan_fwd_kernel": 3.0, "nvjet_x": 5.0, "odd": 1.0})
    assert by_family(by_name) == {"SSD chunk kernels": 3.0, "GEMM (projections + LM head)": 5.0,
                                  OTHER: 1.0}
    rows = budget_table({"auto": {"by_name": by_name, "busy_ms": 10.0, "wall_ms": 12.0}}, 6.0)
    assert rows[2] == "| GEMM (projections + LM head) | 5.0 (50%) |"  # largest family first
    assert rows[-1] == "| matmul-only bound (6N / peak) | 6.0 (50% of wall) |"
