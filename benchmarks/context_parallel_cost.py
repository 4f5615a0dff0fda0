"""What context parallelism costs per rank, measured exactly on CPU: N gloo processes (N = 1, 2, 4
by default), each holding ``L / N`` tokens of one L-token window, run one forward + backward of a
small model on the reference backend (fp32) and count

* the activation bytes kept for the backward: every tensor that autograd saves in the forward
  (``torch.autograd.graph.saved_tensors_hooks``; they also see the inputs that
  ``torch.utils.checkpoint`` keeps for a recompute), each storage once, parameters left out;
  attributed to the layer whose forward saved it (``layer<i>:<mixer>``) or to ``rest``
  (embedding, final norm, LM head and loss);
* the bytes each rank sends and receives in the context-parallel exchanges, per kind of exchange
  and per layer, through ``mamba_train.parallel.tally.count_exchanges`` (every call that
  ``parallel/context_parallel.py`` issues), checked against the formulas of docs/long_context.md
  ("Communication per layer and step"): a ``MATCH`` or ``DIFF`` per line.

The models keep the per-layer shapes of the recipes (mamba_ssm's mixer defaults: Mamba-2 d_state
128 and headdim 64, Mamba-1 d_state 16, Mamba-3 SISO d_state 128 and headdim 64 with RoPE on half
the state, expand 2, d_conv 4; the hybrid's attention layer as mamba2attn-2.7b's: d_conv 4,
head_dim 128, rotary) at d_model 128 and 2 layers, so the formulas are checked with the exponents
they have at scale; bytes scale with widths as the formulas say.

    python benchmarks/context_parallel_cost.py
    python benchmarks/context_parallel_cost.py --ranks 1 2 --lengths 1024 --models mamba2 hybrid

Prints ``CPCOMM`` lines (per model, N, rank and exchange), ``CPMEM`` lines (per model, L and N:
saved bytes per rank) and a final ``CPCHECK`` line. CPU only; GPU memory (kernels' workspaces,
bf16 activations, the allocator) is not measured here.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

VOCAB, D_MODEL, N_LAYER, BATCH = 256, 128, 2, 1
ATTN = {"causal": True, "d_conv": 4, "head_dim": 128, "num_heads": 2, "rotary_emb_dim": 64,
        "qkv_proj_bias": False, "out_proj_bias": False}
MODELS = {
    "mamba2": dict(ssm_cfg={"layer": "Mamba2"}),
    "mamba1": dict(ssm_cfg={"layer": "Mamba1"}),
    "mamba3": dict(ssm_cfg={"layer": "Mamba3"}),
    "hybrid": dict(ssm_cfg={"layer": "Mamba2"}, attn_layer_idx=[1], attn_cfg=ATTN),
}
F32 = 4  # the reference runs fp32: activations and states are 4 bytes per value


def build(name: str):
    from mamba_train.models.build import build_model
    from mamba_train.models.config import MambaLMConfig

    torch.manual_seed(0)
    config = MambaLMConfig(d_model=D_MODEL, n_layer=N_LAYER, vocab_size=VOCAB, **MODELS[name])
    return build_model(config, backend="reference")


# ------------------------------------------------------------------ the doc's formulas, per layer
def formulas(mixer, size: int, rank: int, seqlen: int, batch: int) -> dict:
    """{(key, phase): (sent, received)} bytes per layer for this rank, as docs/long_context.md
    states them: conv halo ``(d_conv-1) x conv_dim x bytes`` to the next rank (the gradient back);
    state + decay all-gathered (``size x (state + decay) x 4`` gathered) and their gradients
    all-reduced at the gathered size; Mamba-3's angle (``nheads x n_angles`` + a decay of 1) the
    same way and its last token's k, v (``nheads x (d_state + headdim) x 4``) point-to-point;
    attention's k and v (``n_kv_heads x head_dim x bytes`` per token each) all-gathered, the
    gradient all-reduced at the whole window."""
    kind = type(mixer).__name__
    first, last = rank == 0, rank == size - 1
    out = {}

    def p2p(key, nbytes):
        out[key, "forward"] = (0 if last else nbytes, 0 if first else nbytes)
        out[key, "backward"] = (0 if first else nbytes, 0 if last else nbytes)

    def scan(key, state, decay):
        pair = (state + decay) * F32 * batch
        out[key, "forward"] = (pair, (size - 1) * pair)
        out[key, "backward"] = (size * pair, size * pair)

    conv = getattr(mixer, "conv1d", None)
    if conv is not None:  # (conv_dim, 1, d_conv)
        p2p("conv", (conv.weight.shape[-1] - 1) * conv.weight.shape[0] * F32 * batch)
    if kind == "Mamba2":
        scan("ssm", mixer.nheads * mixer.headdim * mixer.d_state, mixer.nheads)
    elif kind == "Mamba":
        scan("ssm", mixer.d_inner * mixer.d_state, mixer.d_inner * mixer.d_state)
    elif kind == "Mamba3":
        scan("ssm", mixer.nheads * mixer.headdim * mixer.d_state, mixer.nheads)
        scan("angle", mixer.nheads * mixer.num_rope_angles, 1)
        p2p("kv", mixer.nheads * (mixer.d_state + mixer.headdim) * F32 * batch)
    else:  # attention
        per_token = mixer.num_heads_kv * mixer.head_dim * F32 * batch
        for key in ("k", "v"):
            out[key, "forward"] = (seqlen // size * per_token,
                                   (size - 1) * seqlen // size * per_token)
            out[key, "backward"] = (seqlen * per_token, seqlen * per_token)
    return out


# ------------------------------------------------------------------------------ in each rank
def measure(model, cp, rank: int, seqlen: int) -> dict:
    from mamba_train.parallel.tally import count_exchanges

    g = torch.Generator().manual_seed(seqlen)
    ids = torch.randint(0, VOCAB, (BATCH, seqlen), generator=g)
    labels = torch.randint(0, VOCAB, (BATCH, seqlen), generator=g)
    part = {"input_ids": ids, "labels": labels}
    if cp is not None:
        part = cp.slice(part)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved, seen, label = defaultdict(int), set(), ["rest"]

    def pack(t):  # label[0] is None in the backward: what it saves there is working memory
        s = t.untyped_storage()
        if label[0] and s.data_ptr() not in seen and s.data_ptr() not in params and s.nbytes():
            seen.add(s.data_ptr())
            saved[label[0]] += s.nbytes()
        return t

    hooks = []
    for i, block in enumerate(model.backbone.layers):
        name = f"layer{i}:{type(block.mixer).__name__}"

        def enter(module, args, kwargs, name=name):
            label[0] = tally.label = name

        def leave(module, args, kwargs, output):
            label[0], tally.label = "rest", None

        hooks += [block.register_forward_pre_hook(enter, with_kwargs=True),
                  block.register_forward_hook(leave, with_kwargs=True)]
    model.zero_grad()
    with count_exchanges() as tally, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(part["input_ids"], labels=part["labels"]).loss
        label[0] = None
        loss.backward()
    for h in hooks:
        h.remove()
    expected, by_layer = {}, {}  # (key, phase) -> [per layer]; (key, label) -> forward
    for i, block in enumerate(model.backbone.layers if cp is not None else []):
        name = f"layer{i}:{type(block.mixer).__name__}"
        for (key, phase), v in formulas(block.mixer, cp.size, rank, seqlen, BATCH).items():
            expected.setdefault((key, phase), []).append(v)
            if phase == "forward":
                by_layer[key, name] = v
    comm = {}
    for (key, phase), per_layer in expected.items():
        events = tally.select(key=key, phase=phase)
        n = len(per_layer)
        sent, received = sum(e.sent for e in events), sum(e.received for e in events)
        want = tuple(sum(v[j] for v in per_layer) for j in (0, 1))
        # the forward's events carry their layer: each layer's own bytes must match too
        each = phase != "forward" or all(
            (sum(e.sent for e in events if e.label == name),
             sum(e.received for e in events if e.label == name)) == v
            for (k, name), v in by_layer.items() if k == key)
        comm[f"{key}/{phase}"] = dict(layers=n, calls=len(events), sent=sent, received=received,
                                      want_sent=want[0], want_received=want[1], each_layer=each,
                                      ops=sorted({e.op for e in events}))
    other = [e for e in tally.events if (e.key, e.phase) not in expected]
    comm["other"] = dict(calls=len(other), sent=sum(e.sent for e in other),
                         received=sum(e.received for e in other),
                         keys=sorted({f"{e.key}/{e.phase}/{e.op}" for e in other}))
    return dict(saved=dict(saved), comm=comm, loss=loss.item())


def worker(rank: int, size: int, init_file: str, out: str, models: list[str],
           lengths: list[int]) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=size)
    torch.set_num_threads(1)
    from mamba_train.parallel.context_parallel import ContextParallel

    results = []
    try:
        for name in models:
            model = build(name)
            cp = None  # one rank: whole sequences, as strategy.context_parallel_size=1 runs
            if size > 1:
                cp = ContextParallel(dist.group.WORLD)
                cp.install(model)
            for seqlen in lengths:
                r = measure(model, cp, rank, seqlen)
                results.append(dict(model=name, size=size, rank=rank, seqlen=seqlen, **r))
    finally:
        dist.destroy_process_group()
    Path(out, f"{size}-{rank}.json").write_text(json.dumps(results))


# ------------------------------------------------------------------------------ the parent
def _mib(n: int) -> str:
    return f"{n / 2**20:.3f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--json", help="write every rank's raw result here")
    args = ap.parse_args(argv)
    for seqlen in args.lengths:
        for n in args.ranks:
            if seqlen % n:
                ap.error(f"--lengths {seqlen} does not split into {n} slices")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.ranks:
            mp.spawn(worker, args=(n, str(Path(tmp, f"init{n}")), tmp, args.models,
                                   args.lengths), nprocs=n, join=True)
            for r in range(n):
                rows += json.loads(Path(tmp, f"{n}-{r}.json").read_text())
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    diffs = checks = 0
    for row in rows:
        for what, c in row["comm"].items():
            if what == "other":
                print(f"CPCOMM model={row['model']} N={row['size']} L={row['seqlen']} "
                      f"rank={row['rank']} exchange=other calls={c['calls']} sent={c['sent']} "
                      f"received={c['received']} keys={','.join(c['keys'])}")
                continue
            ok = (c["sent"] == c["want_sent"] and c["received"] == c["want_received"]
                  and c["each_layer"])
            checks += 1
            diffs += not ok
            layers = c["layers"]
            print(f"CPCOMM model={row['model']} N={row['size']} L={row['seqlen']} "
                  f"rank={row['rank']} exchange={what} ops={'+'.join(c['ops']) or '-'} "
                  f"layers={layers} calls={c['calls']} sent/layer={c['sent'] // layers} "
                  f"received/layer={c['received'] // layers} "
                  f"formula={c['want_sent'] // layers}/{c['want_received'] // layers} "
                  f"{'MATCH' if ok else 'DIFF'}")
    one = {(r["model"], r["seqlen"]): sum(r["saved"].values()) for r in rows if r["size"] == 1}
    groups = defaultdict(list)
    for r in rows:
        groups[r["model"], r["seqlen"], r["size"]].append(r)
    for (model, seqlen, size), rs in sorted(groups.items()):
        rs.sort(key=lambda r: r["rank"])
        totals = [sum(r["saved"].values()) for r in rs]
        parts = defaultdict(list)
        for r in rs:
            kinds = defaultdict(int)
            for label, b in r["saved"].items():
                kinds[label.split(":")[-1]] += b
            for k in sorted(set(kinds) | set(parts)):
                parts[k].append(kinds.get(k, 0))
        base = one.get((model, seqlen))
        ratio = f"{max(totals) / base:.3f}" if base else "-"
        detail = " ".join(f"{k}_MiB=[{','.join(_mib(b) for b in v)}]" for k, v in parts.items())
        print(f"CPMEM model={model} L={seqlen} N={size} saved_MiB=[{','.join(map(_mib, totals))}] "
              f"max/N1={ratio} bytes/token(slice)={max(totals) / (seqlen // size):.0f} {detail}")
    print(f"CPCHECK exchanges={checks} match={checks - diffs} diff={diffs}")
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.path.insert(0, os.getcwd())
    sys.exit(main())
