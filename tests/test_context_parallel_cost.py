"""What context parallelism sends and keeps per rank, counted exactly (benchmarks/
context_parallel_cost.py's counters), against numbers worked out by hand from the formulas of
docs/long_context.md ("Communication per layer and step").

One process plays one rank of a two-rank group over torch's fake process group: its collectives
move nothing, but every call, its tensors and their sizes are the real ones, and the shapes that
autograd saves do not depend on the values. So it runs in seconds; the spawned gloo run is the
benchmark (and tests/test_context_parallel.py checks the values).
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore

from mamba_train.parallel.context_parallel import ContextParallel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import context_parallel_cost as cpc  # noqa: E402


@contextlib.contextmanager
def _fake_rank(rank: int, size: int):
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _run(model_name: str, seqlen: int, rank: int | None, size: int = 2) -> dict:
    model = cpc.build(model_name)
    if rank is None:  # whole sequences in one process, as context_parallel_size=1 runs
        return cpc.measure(model, None, 0, seqlen)
    with _fake_rank(rank, size):
        cp = ContextParallel(dist.group.WORLD)
        cp.install(model)
        return cpc.measure(model, cp, rank, seqlen)


def test_exchanged_bytes_per_layer_equal_the_formulas():
    """The hybrid (layer 0 Mamba-2, layer 1 attention with a conv) at CP=2, both ranks, L=256.
    Widths: d_model 128, expand 2 -> d_inner 256; Mamba-2 headdim 64 -> 4 heads, d_state 128,
    1 group -> conv_dim 256 + 2 x 128 = 512; attention 2 heads x head_dim 128 -> qkv 768."""
    halo_m2 = 3 * 512 * 4  # (d_conv - 1) x conv_dim x 4 bytes (fp32)
    halo_attn = 3 * 768 * 4
    pair = (4 * 64 * 128 + 4) * 4  # one rank's (state + decay)
    kv_slice = 128 * 2 * 128 * 4  # 128 tokens x n_kv_heads x head_dim x 4, for k (and for v)
    for rank in (0, 1):
        comm = _run("hybrid", 256, rank)["comm"]
        first = rank == 0
        got = {k: (c["calls"], c["sent"], c["received"]) for k, c in comm.items()}
        assert got == {
            # the halo goes to the next rank, its gradient comes back (one call per layer)
            "conv/forward": (2, halo_m2 + halo_attn if first else 0,
                             0 if first else halo_m2 + halo_attn),
            "conv/backward": (2, 0 if first else halo_m2 + halo_attn,
                              halo_m2 + halo_attn if first else 0),
            # state and decay all-gathered (two calls), the gradients all-reduced at 2 pairs
            "ssm/forward": (2, pair, pair),
            "ssm/backward": (1, 2 * pair, 2 * pair),
            # k and v all-gathered; their gradient all-reduced over the whole window
            "k/forward": (1, kv_slice, kv_slice),
            "k/backward": (1, 2 * kv_slice, 2 * kv_slice),
            "v/forward": (1, kv_slice, kv_slice),
            "v/backward": (1, 2 * kv_slice, 2 * kv_slice),
            "other": (1, 8, 8),  # the loss's (sum, count), once per step
        }, (rank, got)


def test_saved_activations_per_rank_about_halve_at_cp2():
    """Activation bytes kept for the backward, per rank at CP=2 against one process on the whole
    sequence. Mamba-3 (no conv) keeps half plus one state per layer; Mamba-2's reference also
    keeps its halo-extended conv input (a copy, conv_dim x 4 bytes per token of the slice) and a
    few states per layer, nothing else."""
    seqlen = 512
    saved = {}
    for name in ("mamba3", "mamba2"):
        whole = sum(_run(name, seqlen, None)["saved"].values())
        per_rank = [sum(_run(name, seqlen, r)["saved"].values()) for r in (0, 1)]
        saved[name] = (whole, per_rank)
    whole, per_rank = saved["mamba3"]
    assert max(per_rank) <= 0.55 * whole, saved
    whole, per_rank = saved["mamba2"]
    state = 4 * 64 * 128 * 4
    conv_copy = 512 * 4 * (seqlen // 2 + 3)
    assert max(per_rank) <= whole / 2 + cpc.N_LAYER * (conv_copy + 3 * state), saved
    assert min(per_rank) >= whole / 2, saved  # sanity: a slice's own activations are kept
