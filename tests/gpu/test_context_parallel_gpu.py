"""Context parallelism on the fused backend: two ranks, each holding half of every sequence, as
two processes on one GPU (gloo; its point-to-point staged through the host), against one
process on whole sequences.

Checked for Mamba-1 (no documents: its fused scan takes none), Mamba-2 and Mamba-3 with packed
documents that start inside the slices and exactly at the cut, and a Mamba-2 + attention hybrid
with documents (the sliced varlen flash-attention path): the logits of each slice, the loss, and
every parameter's gradient (the data-parallel average over the two ranks) equal the one-process
run. Both runs are bf16 autocast on mamba_ssm's kernels, which round differently per slice (the
kernels' chunks restart at the cut, and the incoming state's term is added in fp32), so the bound
is bf16's: 3e-2 of the largest entry for logits and gradients, 1e-2 relative for the loss; a
missing or wrong carry is O(1). The measured maxima are recorded.

The CPU suite checks the same glue in fp64 with the kernels stood in by the reference
(``tests/test_fused_carried.py``) and the reference backend over two processes
(``tests/test_context_parallel.py``).
"""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD, BATCH, SEQLEN, VOCAB = 2, 2, 512, 256
TOL, LOSS_TOL = 3e-2, 1e-2
ATTN = {"causal": True, "num_heads": 4, "num_heads_kv": 2, "rotary_emb_dim": 16,
        "qkv_proj_bias": False, "out_proj_bias": False}
CASES = {
    "mamba1": dict(ssm_cfg={"layer": "Mamba1", "d_state": 16}),
    "mamba2-docs": dict(ssm_cfg={"layer": "Mamba2", "d_state": 64, "headdim": 32,
                                 "chunk_size": 64}, docs=True),
    "mamba3-docs": dict(ssm_cfg={"layer": "Mamba3", "d_state": 64, "headdim": 32,
                                 "chunk_size": 64}, docs=True),
    "hybrid-docs": dict(ssm_cfg={"layer": "Mamba2", "d_state": 64, "headdim": 32,
                                 "chunk_size": 64},
                        attn_layer_idx=[1], attn_cfg=ATTN, d_intermediate=256, docs=True),
}


def _batch(docs: bool):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (BATCH, SEQLEN), generator=g)
    labels = torch.randint(0, VOCAB, (BATCH, SEQLEN), generator=g)
    labels[0, 10:40] = -100  # ignored tokens in the first slice only
    seq_idx = None
    if docs:  # row 0: documents start inside both slices; row 1: exactly at the cut
        seq_idx = torch.zeros(BATCH, SEQLEN, dtype=torch.int32)
        seq_idx[0, 100:] += 1
        seq_idx[0, 400:] += 1
        seq_idx[1, SEQLEN // 2:] += 1
    return [None if t is None else t.cuda() for t in (ids, labels, seq_idx)]


def _model(case: dict):
    from mamba_train.models.build import build_model
    from mamba_train.models.config import MambaLMConfig

    spec = {k: v for k, v in case.items() if k != "docs"}
    config = MambaLMConfig(d_model=128, n_layer=3, vocab_size=VOCAB, **spec)
    torch.manual_seed(0)
    model = build_model(config, backend="fused", device="cuda")
    with torch.no_grad():  # slow decays: the state entering the second slice matters
        for name, p in model.named_parameters():
            if name.endswith(("A_log", "dt_bias")):
                p.uniform_(-1.0, 0.5)
    return model


def _run(model, ids, labels, seq_idx):
    """(logits, loss, gradients) under bf16 autocast."""
    model.zero_grad()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        with torch.no_grad():
            logits = model(ids, seq_idx=seq_idx).logits.float()
        loss = model(ids, seq_idx=seq_idx, labels=labels).loss
    loss.backward()
    return logits, loss.detach().float(), {n: p.grad.float().clone()
                                           for n, p in model.named_parameters()}


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def _worker(rank: int, port: int, out: str) -> None:
    from mamba_train.parallel.context_parallel import ContextParallel

    torch.cuda.set_device(0)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD)
    results = {}
    try:
        for name, case in CASES.items():
            model = _model(case)
            ids, labels, seq_idx = _batch(case.get("docs", False))
            ref_logits, ref_loss, ref = _run(model, ids, labels, seq_idx)
            cp = ContextParallel(dist.group.WORLD)
            cp.install(model)
            part = cp.slice({"input_ids": ids, "labels": labels, "seq_idx": seq_idx})
            logits, loss, got = _run(model, part["input_ids"], part["labels"], part["seq_idx"])
            cp.remove(model)
            for g in got.values():  # the data-parallel average over the group's ranks
                dist.all_reduce(g)
                g /= WORLD
            n = SEQLEN // WORLD
            slice_ref = ref_logits[:, rank * n:(rank + 1) * n]
            errs = torch.tensor([_rel(logits, slice_ref), abs(loss - ref_loss).item() /
                                 ref_loss.abs().item()], device="cuda")
            dist.all_reduce(errs, op=dist.ReduceOp.MAX)
            grads = {p: _rel(got[p], r) for p, r in ref.items()}
            results[name] = (errs[0].item(), errs[1].item(), grads)
            if rank == 0:  # as each case ends (the device run reads them even if cut short)
                worst = max(grads, key=grads.get)
                print(f"CP case {name}: logits {errs[0].item():.2e} loss {errs[1].item():.2e} "
                      f"worst gradient {worst} {grads[worst]:.2e}", flush=True)
        if rank == 0:
            torch.save(results, out)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fused_context_parallel_matches_one_process(tmp_path, record):
    pytest.importorskip("mamba_ssm")
    out = tmp_path / "results.pt"
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    results = torch.load(out)
    failures = []
    for name, (logits, loss, grads) in results.items():
        worst = max(grads, key=grads.get)
        record(f"fused context parallel (2 ranks, bf16), {name}: logits {logits:.2e}, loss "
               f"{loss:.2e}, worst gradient {worst} {grads[worst]:.2e}")
        if logits > TOL or loss > LOSS_TOL or grads[worst] > TOL:
            failures.append(f"{name}: logits {logits:.2e}, loss {loss:.2e}, {worst} "
                            f"{grads[worst]:.2e} (bounds {TOL}, {LOSS_TOL})")
    assert not failures, "; ".join(failures)
