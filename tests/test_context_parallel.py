"""Context parallelism over 2 and 4 gloo processes (reference backend, fp32): the loss and the
gradient of every parameter with each rank holding a slice of every sequence equal the one-process run on
whole sequences, for Mamba-1, -2, -3, a hybrid with attention, packed documents that cross the
slice boundary, activation checkpointing, and mixture-of-experts layers with their balancing
terms (auxiliary and z-loss over the whole sequence).

Tolerance: fp32 summation noise. The slices sum the same terms in another order (per-slice
scans, then the carried state's contribution; the gradient averaged over the ranks): 2e-5 of the
largest entry is asserted (fp32 epsilon is 1.2e-7), where a wrong carry or halo is O(1); the
loss to 1e-6 relative.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mamba_train.models.build import build_model
from mamba_train.models.config import MambaLMConfig
from mamba_train.parallel.context_parallel import ContextParallel
from mamba_train.training.step.activation_checkpointing import apply_activation_checkpointing

BATCH, SEQLEN, VOCAB = 2, 32, 128
ATTN = {"causal": True, "num_heads": 2, "rotary_emb_dim": 8, "qkv_proj_bias": False,
        "out_proj_bias": False}
CASES = {
    "mamba1": dict(ssm_cfg={"layer": "Mamba1", "d_state": 4}),
    "mamba2": dict(ssm_cfg={"layer": "Mamba2", "d_state": 8, "headdim": 8, "chunk_size": 8}),
    "mamba3": dict(ssm_cfg={"layer": "Mamba3", "d_state": 8, "headdim": 8, "chunk_size": 8}),
    "hybrid": dict(ssm_cfg={"layer": "Mamba2", "d_state": 8, "headdim": 8, "chunk_size": 8},
                   attn_layer_idx=[1], attn_cfg=ATTN, d_intermediate=64),
    "packed-mamba3": dict(ssm_cfg={"layer": "Mamba3", "d_state": 8, "headdim": 8,
                                   "chunk_size": 8}, docs=True),
    "packed-hybrid": dict(ssm_cfg={"layer": "Mamba2", "d_state": 8, "headdim": 8,
                                   "chunk_size": 8}, attn_layer_idx=[1], attn_cfg=ATTN,
                          docs=True),
    "packed-mamba1-checkpointed": dict(ssm_cfg={"layer": "Mamba1", "d_state": 4}, docs=True,
                                       checkpointing=True),
    # the balancing terms are statistics of the whole sequence, not means of per-slice terms
    "moe-aux-and-z-loss": dict(ssm_cfg={"layer": "Mamba2", "d_state": 8, "headdim": 8,
                                        "chunk_size": 8}, layer_pattern="MEM*E", attn_cfg=ATTN,
                               moe_cfg=dict(n_experts=4, top_k=2, d_expert=16, router="softmax",
                                            aux_loss_coef=0.1, z_loss_coef=0.01)),
    "moe-sigmoid-shared": dict(ssm_cfg={"layer": "Mamba2", "d_state": 8, "headdim": 8,
                                        "chunk_size": 8}, layer_pattern="MEMEME", docs=True,
                               moe_cfg=dict(n_experts=4, top_k=2, d_expert=16, d_shared=16,
                                            act="relu2", router="sigmoid", n_group=2,
                                            topk_group=1, routed_scaling_factor=2.0,
                                            score_correction_bias=True)),
}


def _batch(docs: bool):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (BATCH, SEQLEN), generator=g)
    labels = torch.randint(0, VOCAB, (BATCH, SEQLEN), generator=g)
    labels[0, 3:9] = -100  # ignored tokens, all in the first slice: the halves weigh differently
    seq_idx = None
    if docs:  # documents start inside the slices and right at the boundary (row 1)
        seq_idx = torch.zeros(BATCH, SEQLEN, dtype=torch.int32)
        seq_idx[0, 10:] += 1
        seq_idx[0, 20:] += 1
        seq_idx[1, SEQLEN // 2:] += 1
    return ids, labels, seq_idx


def _model(case: dict):
    spec = {k: v for k, v in case.items() if k not in ("docs", "checkpointing")}
    config = MambaLMConfig(d_model=32, n_layer=3, vocab_size=VOCAB, **spec)
    torch.manual_seed(0)
    model = build_model(config, backend="reference")
    with torch.no_grad():  # slow decays: the state entering the second slice matters
        for name, p in model.named_parameters():
            if name.endswith(("A_log", "dt_bias")):
                p.uniform_(-1.0, 0.5)
    if case.get("checkpointing"):
        apply_activation_checkpointing(model, "all", 2)
    return model


def _loss_and_grads(model, ids, labels, seq_idx):
    model.zero_grad()
    loss = model(ids, seq_idx=seq_idx, labels=labels).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _worker(rank: int, init_file: str, cases: list[str], world: int) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    torch.set_num_threads(1)
    try:
        for name in cases:
            case = CASES[name]
            model = _model(case)
            ids, labels, seq_idx = _batch(case.get("docs", False))
            ref_loss, ref = _loss_and_grads(model, ids, labels, seq_idx)
            cp = ContextParallel(dist.group.WORLD)
            cp.install(model)
            part = cp.slice({"input_ids": ids, "labels": labels, "seq_idx": seq_idx})
            loss, got = _loss_and_grads(model, part["input_ids"], part["labels"],
                                        part["seq_idx"])
            cp.remove(model)
            for g in got.values():  # the data-parallel average over the group's ranks
                dist.all_reduce(g)
                g /= world
            assert torch.allclose(loss, ref_loss, rtol=1e-6, atol=0), (name, loss, ref_loss)
            for pname, r in ref.items():
                err = (got[pname] - r).abs().max().item()
                assert err <= 2e-5 * r.abs().max().item() + 1e-9, (name, pname, err)
    finally:
        dist.destroy_process_group()


def _spawn(tmp_path, cases, world=2):
    mp.spawn(_worker, args=(str(tmp_path / "init"), cases, world), nprocs=world, join=True)


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_context_parallel_matches_one_process(tmp_path, world):
    """CP=4 gives 8-token slices: documents and the conv window cross several boundaries."""
    _spawn(tmp_path, list(CASES), world)


@pytest.mark.slow
def test_context_parallel_mamba2_matches_one_process(tmp_path):
    """Mamba-2 alone (two processes start in ~20 s on a loaded CPU, hence slow as well)."""
    _spawn(tmp_path, ["mamba2"])


def test_window_that_does_not_split_is_refused():
    cp = ContextParallel.__new__(ContextParallel)
    cp.carry = type("C", (), {"size": 3, "rank": 0})()
    with pytest.raises(ValueError, match="multiple of strategy.context_parallel_size"):
        cp.slice({"input_ids": torch.zeros(1, 32, dtype=torch.long)})
