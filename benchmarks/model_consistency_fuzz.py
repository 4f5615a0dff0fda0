"""Randomised internal-consistency check of the model code (CPU, reference backend, fp32).

For each seed: draw a small ``MambaLMConfig`` -- a random layer pattern mixing ``M`` / ``*`` /
``-`` / ``E`` / ``P`` (or mamba_ssm's ``attn_layer_idx`` layout), a Mamba-1, Mamba-2 or Mamba-3
mixer with random options (state and conv sizes, widths, heads, groups, chunk sizes that the
sequence length is not a multiple of, norms, gates, dt limits, biases, Mamba-3's RoPE and A
options), attention with GQA/MQA, head_dim, full/partial/no rotary, biases, MLP activations,
routers and experts, multipliers, tying, norms and odd vocabularies -- or, for about one draw in
six, a config with one field made invalid. Then check what must hold for any valid model:

  docs        packed documents (``seq_idx``) give each document's logits and parameter gradients
              run alone;
  slices      the sequence run as 2-3 consecutive slices through ``StateCarry`` (one per mixer)
              gives the whole-sequence logits and every parameter gradient (with and without
              document boundaries);
  causal      changing token t leaves the logits before t unchanged;
  batch       a row's logits do not depend on the other rows (routing included);
  ckpt        activation checkpointing leaves the loss and every gradient unchanged;
  loss        ``model(ids, labels=)`` is the cross-entropy of the logits (ignore_index -100)
              plus the balancing terms recomputed from the routers' outputs;
  io          config dict round trip; save_pretrained -> load_model gives identical logits;
  init        a seeded build is reproducible, ``reset_parameters`` under the same seed redraws
              the same weights, and the init guard (``check_ssm_init``) accepts the fresh model;
  count       active <= total parameters (equal without experts), matmul weights counted from the
              module tree, SSM FLOPs recomputed from the built mixers, FLOPs per token constant in
              the sequence length for SSM-only models (at lengths >= the chunk size).

An invalid config must be refused with one line (a ``MambaTrainError``) when the config is made
or the model built; anything else is a FAIL. One line per seed:

  PASS | FAIL <property>: <detail> | REFUSED <message>

then a summary. ``python benchmarks/model_consistency_fuzz.py --seeds 50 --first-seed 0``.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import traceback
import warnings
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TOL = {torch.float32: 2e-4, torch.float64: 1e-6}  # relative to the compared tensor's scale
DTYPE = torch.float32  # --dtype float64: tells a genuine mismatch from fp32 rounding


class Mismatch(Exception):
    pass


# ------------------------------------------------------------------------------ drawing configs
def _divisors(n: int, lo: int = 1, hi: int | None = None) -> list[int]:
    return [d for d in range(max(lo, 1), (hi or n) + 1) if n % d == 0]


def _pattern(r: random.Random) -> str:
    n = r.randrange(1, 6)
    weights = dict(M=4, **{"*": 2}, P=1, E=1.5, **{"-": 2})
    syms = r.choices(list(weights), weights=list(weights.values()), k=n)
    if not any(c in "M*P" for c in syms):
        syms[0] = "M"
    return "".join(syms)


def _dt(r: random.Random) -> dict:
    """The Δ init range: log-uniform [dt_min, dt_max] floored at dt_init_floor -- narrow, a
    single value, or entirely below the floor at times."""
    t_min = r.choice([1e-3, 1e-2])
    return dict(dt_min=t_min, dt_max=r.choice([0.1, 0.05, 4 * t_min, 1.2 * t_min, t_min]),
                dt_init_floor=r.choice([1e-4, 1e-4, 1e-3, 0.2]))


def _mamba1(r: random.Random, d_model: int) -> dict:
    return dict(layer="Mamba1", **_dt(r), d_state=r.choice([1, 2, 4, 8, 16]), d_conv=r.choice([1, 2, 3, 4]),
                expand=r.choice([1, 2, 3]), dt_rank=r.choice(["auto", 1, 3]),
                dt_init=r.choice(["random", "constant"]), dt_scale=r.choice([1.0, 0.5, 2.0]),
                conv_bias=r.random() < 0.6, bias=r.random() < 0.3, dt_bc_norm=r.random() < 0.3)


def _mamba2(r: random.Random, d_model: int) -> dict:
    out = dict(layer="Mamba2", **_dt(r))
    d_inner = r.choice([d_model, 2 * d_model])
    if r.random() < 0.25:
        d_inner = r.choice([d + 4 for d in (d_model, 2 * d_model)])
        out["d_inner"] = d_inner
    else:
        out["expand"] = d_inner // d_model
    headdim = r.choice(_divisors(d_inner, 2, 16) or [d_inner])
    d_ssm = d_inner
    if r.random() < 0.2 and d_inner // headdim >= 2:  # part of the inner width as a gated MLP
        d_ssm = headdim * r.randrange(1, d_inner // headdim)
        out["d_ssm"] = d_ssm
    nheads = d_ssm // headdim
    out.update(headdim=headdim, ngroups=r.choice(_divisors(nheads)),
               d_state=r.choice([1, 2, 4, 8, 16]), d_conv=r.choice([1, 2, 3, 4]),
               chunk_size=r.choice([4, 8, 16, 32]), rmsnorm=r.random() < 0.7,
               norm_before_gate=r.random() < 0.4, D_has_hdim=r.random() < 0.4,
               dt_limit=r.choice([(0.0, float("inf")), (0.001, 0.5), (0.01, 0.05)]),
               bias=r.random() < 0.3, conv_bias=r.random() < 0.6)
    if r.random() < 0.2:
        out.update(A_init="arange")
    if r.random() < 0.2:
        out.update(dt_bias_init=1.0)
    if r.random() < 0.2:
        out.update(conv_init=0.5)
    if r.random() < 0.2:
        out.update(A_init_range=(2.0, 4.0))
    if r.random() < 0.2:
        out.update(norm_eps=1e-6)
    return out


def _mamba3(r: random.Random, d_model: int) -> dict:
    expand = r.choice([1, 2])
    d_inner = expand * d_model
    headdim = r.choice(_divisors(d_inner, 2, 16) or [d_inner])
    rope = r.choice([0.5, 1.0])
    d_state = r.choice([s for s in (4, 8, 16, 32) if int(s * rope) % 4 == 0])
    return dict(layer="Mamba3", **_dt(r), expand=expand, headdim=headdim,
                ngroups=r.choice(_divisors(d_inner // headdim)), d_state=d_state,
                rope_fraction=rope, chunk_size=r.choice([4, 8, 16, 32]),
                A_floor=r.choice([1e-4, 1e-2]), is_outproj_norm=r.random() < 0.4,
                A_activation=r.choice(["softplus", "heavy_tail"]))


def _attn(r: random.Random, d_model: int) -> dict:
    heads = r.choice(_divisors(d_model, 1, 4))
    head_dim = r.choice([None, None, 4, 6, 8])
    hd = head_dim or d_model // heads
    rot = r.choice([0, hd - hd % 2, 2 * (hd // 4)])
    out = dict(num_heads=heads, num_heads_kv=r.choice([None] + _divisors(heads)), causal=True,
               head_dim=head_dim, rotary_emb_dim=rot, rotary_emb_interleaved=r.random() < 0.3,
               qkv_proj_bias=r.random() < 0.5, out_proj_bias=r.random() < 0.5)
    if r.random() < 0.2:
        out["softmax_scale"] = 0.3
    if r.random() < 0.1:
        out["rotary_emb_base"] = 500.0
    if r.random() < 0.1:
        out["d_conv"] = r.choice([2, 3])
    if r.random() < 0.1:
        out["mlp_dim"] = 16
    return out


def _moe(r: random.Random) -> dict:
    n = r.choice([1, 2, 4, 6, 8])
    out = dict(n_experts=n, top_k=r.randrange(1, n + 1), d_expert=r.choice([4, 8, 12]),
               act=r.choice(["swiglu", "relu2"]), router=r.choice(["softmax", "sigmoid"]),
               norm_topk_prob=r.random() < 0.5, d_shared=r.choice([0, 0, 8]),
               impl=r.choice(["loop", "grouped", "auto"]))
    if r.random() < 0.3:
        out["routed_scaling_factor"] = 2.5
    if r.random() < 0.4:
        out["aux_loss_coef"] = 0.01
    if r.random() < 0.3:
        out["z_loss_coef"] = 0.001
    if out["router"] == "sigmoid":
        out["score_correction_bias"] = r.random() < 0.5
        groups = [g for g in _divisors(n) if g > 1 and n // g >= 2]
        if groups and r.random() < 0.5:
            out["n_group"] = r.choice(groups)
            out["topk_group"] = r.randrange(1, out["n_group"] + 1)
    return out


def _multipliers(r: random.Random, ssm: dict) -> dict:
    names = ["embedding", "lm_head", "attn_in", "attn_out", "key", "ssm_in", "ssm_out",
             "mlp_gate", "mlp_down"]
    out = {k: r.choice([0.5, 2.0]) for k in r.sample(names, r.randrange(0, 4))}
    if ssm["layer"] == "Mamba2" and "d_ssm" not in ssm and r.random() < 0.3:
        out["ssm_zxbcdt"] = tuple(r.choice([1.0, 0.5, 2.0]) for _ in range(5))
    return out


def draw(r: random.Random) -> dict:
    """A valid config (kwargs of MambaLMConfig), most of the time."""
    from mamba_train.models.pattern import parse_pattern

    d_model = r.choice([8, 12, 16, 24, 32])
    layer = r.choice(["Mamba1", "Mamba2", "Mamba3"])
    ssm = {"Mamba1": _mamba1, "Mamba2": _mamba2, "Mamba3": _mamba3}[layer](r, d_model)
    vocab = r.choice([r.randrange(20, 130), 8 * r.randrange(3, 12)])
    spec = dict(d_model=d_model, vocab_size=vocab, ssm_cfg=ssm,
                pad_vocab_size_multiple=r.choice([1, 8, 16]), tie_embeddings=r.random() < 0.5,
                residual_in_fp32=r.random() < 0.5, rms_norm=r.random() < 0.6,
                norm_epsilon=r.choice([1e-5, 1e-6]))
    if r.random() < 0.2:  # mamba_ssm's layout: attention at attn_layer_idx, MLP everywhere or none
        n = r.randrange(1, 4)
        spec.update(n_layer=n, attn_layer_idx=sorted(r.sample(range(n), r.randrange(0, n + 1))),
                    d_intermediate=r.choice([0, 16]))
        has_attn, has_mlp, has_moe = bool(spec["attn_layer_idx"]), spec["d_intermediate"] > 0, False
    else:
        pattern = _pattern(r)
        blocks = parse_pattern(pattern)
        has_attn = any(b.has_attention for b in blocks)
        has_mlp = any(b.mlp and not b.moe for b in blocks)
        has_moe = any(b.moe for b in blocks)
        spec.update(layer_pattern=pattern, n_layer=len(blocks),
                    d_intermediate=r.choice([8, 16, 20]) if has_mlp else 0)
    if has_attn:
        spec["attn_cfg"] = _attn(r, d_model)
    if has_mlp:
        spec["mlp_cfg"] = dict(act=r.choice(["swiglu", "relu2"]), bias=r.random() < 0.3,
                               multiple_of=r.choice([1, 8, 16]))
    if has_moe:
        spec["moe_cfg"] = _moe(r)
    spec["multipliers"] = _multipliers(r, ssm)
    if spec.get("mlp_cfg", {}).get("act") == "relu2":
        spec["multipliers"].pop("mlp_gate", None)
    if r.random() < 0.15:
        spec["padding_idx"] = r.randrange(vocab)
    if r.random() < 0.2:
        spec["initializer_cfg"] = dict(initializer_range=0.05,
                                       rescale_prenorm_residual=r.random() < 0.5)
    return spec


# one field made invalid: (what, how) -- applied where the field exists
INVALID = [
    ("ssm headdim 0", lambda s: s["ssm_cfg"].get("layer") != "Mamba1" and s["ssm_cfg"].update(headdim=0)),
    ("ssm headdim not dividing", lambda s: s["ssm_cfg"].get("layer") != "Mamba1" and s["ssm_cfg"].update(headdim=7)),
    ("ssm ngroups 0", lambda s: s["ssm_cfg"].get("layer") != "Mamba1" and s["ssm_cfg"].update(ngroups=0)),
    ("ssm ngroups 3", lambda s: s["ssm_cfg"].get("layer") != "Mamba1" and s["ssm_cfg"].update(ngroups=3)),
    ("ssm chunk_size 12", lambda s: s["ssm_cfg"].get("layer") != "Mamba1" and s["ssm_cfg"].update(chunk_size=12)),
    ("ssm d_state 0", lambda s: s["ssm_cfg"].update(d_state=0)),
    ("ssm d_conv 0", lambda s: s["ssm_cfg"].get("layer") != "Mamba3" and s["ssm_cfg"].update(d_conv=0)),
    ("ssm expand 0", lambda s: s["ssm_cfg"].update(expand=0)),
    ("ssm dt_min > dt_max", lambda s: s["ssm_cfg"].update(dt_min=0.2, dt_max=0.1)),
    ("ssm dt_rank 0", lambda s: s["ssm_cfg"].get("layer") == "Mamba1" and s["ssm_cfg"].update(dt_rank=0)),
    ("ssm dt_limit reversed", lambda s: s["ssm_cfg"].get("layer") == "Mamba2" and s["ssm_cfg"].update(dt_limit=(0.5, 0.1))),
    ("ssm unknown key", lambda s: s["ssm_cfg"].update(d_sate=4)),
    ("attn num_heads 0", lambda s: "attn_cfg" in s and s["attn_cfg"].update(num_heads=0)),
    ("attn kv heads not dividing", lambda s: "attn_cfg" in s and s["attn_cfg"].update(num_heads=4, num_heads_kv=3, head_dim=4)),
    ("attn odd rotary", lambda s: "attn_cfg" in s and s["attn_cfg"].update(rotary_emb_dim=3)),
    ("attn head_dim 0", lambda s: "attn_cfg" in s and s["attn_cfg"].update(head_dim=0, num_heads=3)),
    ("moe top_k > n", lambda s: "moe_cfg" in s and s["moe_cfg"].update(top_k=s["moe_cfg"]["n_experts"] + 1)),
    ("moe n_group 0", lambda s: "moe_cfg" in s and s["moe_cfg"].update(router="sigmoid", n_group=0)),
    ("mlp multiple_of 0", lambda s: "mlp_cfg" in s and s["mlp_cfg"].update(multiple_of=0)),
    ("relu2 with mlp_gate", lambda s: "mlp_cfg" in s and (s["mlp_cfg"].update(act="relu2") or s["multipliers"].update(mlp_gate=2.0))),
    ("zxbcdt with d_ssm", lambda s: s["ssm_cfg"].get("layer") == "Mamba2" and s["ssm_cfg"].get("expand") == 2
        and (s["ssm_cfg"].update(d_ssm=s["ssm_cfg"]["headdim"]) or s["multipliers"].update(ssm_zxbcdt=(2.0, 1, 1, 1, 1)))),
    ("d_intermediate negative", lambda s: s.update(d_intermediate=-1)),
    ("vocab 0", lambda s: s.update(vocab_size=0)),
]


def maybe_invalid(r: random.Random, spec: dict) -> str | None:
    """Make one field invalid in about one draw in six; returns what was changed."""
    if r.random() > 1 / 6:
        return None
    for what, how in r.sample(INVALID, len(INVALID)):
        if how(spec) is not False:
            return what
    return None


# ------------------------------------------------------------------------------ checks
def close(what: str, got: torch.Tensor, want: torch.Tensor, tol: float | None = None,
          floor: float = 1e-3) -> None:
    tol = TOL[DTYPE] if tol is None else tol
    if got.shape != want.shape:
        raise Mismatch(f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}")
    if not torch.isfinite(want).all():
        raise Mismatch(f"{what}: non-finite reference values")
    scale = max(float(want.abs().max()) if want.numel() else 0.0, floor)
    err = float((got - want).abs().max()) if want.numel() else 0.0
    if not err <= tol * scale:
        raise Mismatch(f"{what}: max |diff| {err:.3g} (scale {scale:.3g})")


def grads(model) -> dict[str, torch.Tensor]:
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
            for n, p in model.named_parameters()}


def close_grads(what: str, got: dict, want: dict, tol: float | None = None) -> None:
    """Each parameter's gradient, relative to its own scale or, for a parameter whose gradient
    is tiny, 1e-3 of the largest gradient (rounding grows with the terms summed, not the sum)."""
    floor = 1e-3 * max(float(g.abs().max()) for g in want.values() if g.numel())
    for n in want:
        close(f"{what} grad {n}", got[n], want[n], tol, floor)


def carried_modules(model):
    return [m for m in model.modules() if hasattr(type(m), "sequence_carry")]


def run_slices(model, ids, seq_idx, bounds, weight):
    """Logits of ``ids`` run as slices [bounds[i], bounds[i+1]) through one StateCarry per
    carried module; backward of sum(logits * weight) over all slices."""
    from mamba_train.models.state_passing import StateCarry

    mods = carried_modules(model)
    carries = [StateCarry() for _ in mods]
    outs = []
    try:
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            for m, c in zip(mods, carries):
                m.sequence_carry = c
            sl = None if seq_idx is None else seq_idx[:, lo:hi]
            outs.append(model(ids[:, lo:hi], seq_idx=sl).logits)
            carries = [c.next(sl, hi - lo) for c in carries]
    finally:
        for m in mods:
            m.sequence_carry = None
    logits = torch.cat(outs, dim=1)
    model.zero_grad()
    (logits * weight).sum().backward()
    return logits.detach(), grads(model)


def whole(model, ids, seq_idx, weight):
    model.zero_grad()
    logits = model(ids, seq_idx=seq_idx).logits
    (logits * weight).sum().backward()
    return logits.detach(), grads(model)


def random_seq_idx(g: torch.Generator, batch: int, seqlen: int) -> torch.Tensor:
    rows = []
    for _ in range(batch):
        lengths, left = [], seqlen
        while left:
            n = min(left, int(torch.randint(1, max(2, seqlen // 2), (1,), generator=g)))
            lengths.append(n)
            left -= n
        rows.append(torch.cat([torch.full((n,), i, dtype=torch.int32)
                               for i, n in enumerate(lengths)]))
    return torch.stack(rows)


def check_docs(model, ids, g):
    batch, seqlen = ids.shape
    seq_idx = random_seq_idx(g, batch, seqlen)
    weight = torch.randn(*ids.shape, model.lm_head.out_features, generator=g)
    packed, gp = whole(model, ids, seq_idx, weight)
    model.zero_grad()
    parts = torch.empty_like(packed)
    for b in range(batch):
        for doc in seq_idx[b].unique():
            cols = (seq_idx[b] == doc).nonzero().flatten()
            lo, hi = int(cols[0]), int(cols[-1]) + 1
            out = model(ids[b:b + 1, lo:hi]).logits
            (out * weight[b:b + 1, lo:hi]).sum().backward()
            parts[b, lo:hi] = out[0].detach()
    close("docs logits", packed, parts)
    close_grads("docs", gp, grads(model))
    return seq_idx


def slice_bounds(g, seqlen: int, min_len: int) -> list[int]:
    n = int(torch.randint(2, 4, (1,), generator=g))
    for _ in range(20):
        cuts = sorted(torch.randperm(seqlen - 1, generator=g)[:n - 1].add(1).tolist())
        bounds = [0] + cuts + [seqlen]
        if all(b - a >= min_len for a, b in zip(bounds[:-1], bounds[1:])):
            return bounds
    return [0, seqlen // 2, seqlen]


def min_slice(model) -> int:
    widths = [m.conv1d.weight.shape[-1] for m in model.modules()
              if hasattr(m, "conv1d") and hasattr(type(m), "sequence_carry")]
    return max([1] + [w - 1 for w in widths])


def check_slices(model, ids, g, seq_idx):
    weight = torch.randn(*ids.shape, model.lm_head.out_features, generator=g)
    bounds = slice_bounds(g, ids.shape[1], min_slice(model))
    want, gw = whole(model, ids, seq_idx, weight)
    got, gs = run_slices(model, ids, seq_idx, bounds, weight)
    tag = f"slices{bounds}{'+docs' if seq_idx is not None else ''}"
    close(f"{tag} logits", got, want)
    close_grads(tag, gs, gw)


def check_causal_and_batch(model, ids, g):
    with torch.no_grad():
        base = model(ids).logits
        t = int(torch.randint(1, ids.shape[1], (1,), generator=g))
        changed = ids.clone()
        changed[0, t] = (changed[0, t] + 1) % model.config.vocab_size
        after = model(changed).logits
        close(f"causal t={t} logits before t", after[0, :t], base[0, :t], 1e-5)
        for b in range(ids.shape[0]):
            close(f"batch row {b}", model(ids[b:b + 1]).logits[0], base[b], 1e-5)
        last = int(torch.randint(1, ids.shape[1] + 1, (1,), generator=g))
        close(f"num_last_tokens={last}", model(ids, num_last_tokens=last).logits,
              base[:, -last:], 1e-6)  # a (B, last) matmul may round differently


def expected_balance(captured, cfg) -> torch.Tensor | None:
    total = None
    for logits, probs, _, idx in captured:
        n, tokens = cfg["n_experts"], logits.shape[0]
        term = None
        if cfg["aux_loss_coef"]:
            f = torch.zeros(n).index_add_(0, idx.flatten(), torch.ones(idx.numel())) / tokens
            term = cfg["aux_loss_coef"] * n * (f * probs.mean(0)).sum()
        if cfg["z_loss_coef"]:
            z = cfg["z_loss_coef"] * torch.logsumexp(logits, -1).square().mean()
            term = z if term is None else term + z
        if term is not None:
            total = term if total is None else total + term
    return total


def check_loss_and_ckpt(model, ids, g):
    from mamba_train.models.moe import Router
    from mamba_train.training.step.activation_checkpointing import apply_activation_checkpointing

    labels = torch.randint(0, model.config.vocab_size, ids.shape, generator=g)
    labels[torch.rand(ids.shape, generator=g) < 0.2] = -100
    labels[0, 0] = 1
    captured = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: captured.append(
        tuple(t.detach() for t in out))) for m in model.modules() if isinstance(m, Router)]
    try:
        model.zero_grad()
        out = model(ids, labels=labels, loss_chunk_size=int(torch.randint(3, 40, (1,), generator=g)))
        out.loss.backward()
    finally:
        for h in hooks:
            h.remove()
    base_grads = grads(model)
    with torch.no_grad():
        logits = model(ids).logits
    ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    balance = expected_balance(captured, model.config.moe_kwargs()) if model.config.n_moe_layers else None
    if (balance is None) != (out.balance is None):
        raise Mismatch(f"loss: balance {out.balance} but expected {balance}")
    if balance is not None:
        close("loss balance", out.balance.detach(), balance, 1e-5)
    close("loss", out.loss.detach(), ce + (0 if balance is None else balance), 1e-5)

    k = int(torch.randint(1, 3, (1,), generator=g))
    policy = "all" if k == 1 else "every_k"
    try:
        apply_activation_checkpointing(model, policy, k=k)
        model.zero_grad()
        again = model(ids, labels=labels)
        again.loss.backward()
    finally:
        apply_activation_checkpointing(model, "off")
    close(f"ckpt {policy} loss", again.loss.detach(), out.loss.detach(), 1e-6)
    # gradients: the recompute adds the same terms, in another order at times (fp32 rounding)
    close_grads(f"ckpt {policy}", grads(model), base_grads, TOL[DTYPE] / 20)


def check_io(model, ids, tmp: Path, g):
    from mamba_train.formats.load import load_model
    from mamba_train.models.config import MambaLMConfig

    cfg = model.config
    again = MambaLMConfig.from_dict(cfg.to_dict())
    if again.to_dict() != cfg.to_dict() or again.blocks != cfg.blocks:
        raise Mismatch("io: config dict round trip differs")
    safe = bool(torch.randint(0, 2, (1,), generator=g))
    model.save_pretrained(tmp / "m", safe_serialization=safe)
    loaded = load_model(tmp / "m", backend="reference", device="cpu").to(DTYPE)
    with torch.no_grad():
        close(f"io logits (safetensors={safe})", loaded(ids).logits, model(ids).logits, 0.0)
    sd, sd2 = model.state_dict(), loaded.state_dict()
    if sorted(sd) != sorted(sd2):
        raise Mismatch(f"io: state-dict keys differ {sorted(set(sd) ^ set(sd2))[:4]}")
    if cfg.tie_embeddings and loaded.lm_head.weight is not loaded.backbone.embedding.weight:
        raise Mismatch("io: tied head not tied after load")


def check_init(spec: dict, seed: int):
    from mamba_train import build_model
    from mamba_train.models.config import MambaLMConfig
    from mamba_train.models.init import check_ssm_init

    torch.manual_seed(seed)
    a = build_model(MambaLMConfig(**spec), backend="reference")
    torch.manual_seed(seed)
    b = build_model(MambaLMConfig(**spec), backend="reference")
    sa = a.state_dict()
    for k, v in b.state_dict().items():
        if not torch.equal(v, sa[k]):
            raise Mismatch(f"init: seeded builds differ at {k}")
    with torch.no_grad():
        for p in b.parameters():
            p.add_(1.0)
    torch.manual_seed(seed)
    b.reset_parameters()
    for k, v in b.state_dict().items():
        if not torch.equal(v, sa[k]):
            raise Mismatch(f"init: reset_parameters under the seed differs at {k}")
    n = check_ssm_init(a)
    if n != a.config.n_ssm_layers:
        raise Mismatch(f"init: guard checked {n} mixers of {a.config.n_ssm_layers}")


def check_counts(model):
    from torch import nn

    from mamba_train.models.flops import flops_breakdown, matmul_params, ssm_flops_per_token
    from mamba_train.models.moe import MoE

    cfg = model.config
    total, active = model.num_parameters(), model.num_active_parameters()
    if not active <= total or (not cfg.n_moe_layers and active != total):
        raise Mismatch(f"count: active {active} vs total {total}")
    moe_ids = {id(p) for m in model.modules() if isinstance(m, MoE)
               for p in (m.experts.fc1.weight, m.experts.fc2.weight)}
    want = cfg.padded_vocab_size * cfg.d_model  # the head, tied or not
    for name, p in model.named_parameters():
        if name.endswith("weight") and p.dim() >= 2 and "embedding" not in name \
                and name != "lm_head.weight" and id(p) not in moe_ids:
            want += p.numel()
    for m in model.modules():
        if isinstance(m, MoE):
            want += (m.experts.fc1.weight.numel() + m.experts.fc2.weight.numel()) \
                * m.cfg["top_k"] // m.cfg["n_experts"]
    if matmul_params(cfg) != want:
        raise Mismatch(f"count: matmul_params {matmul_params(cfg)} != weights counted {want}")
    # SSM FLOPs per token from the built mixers' own shapes (the flops.py formulas)
    for block in model.backbone.layers:
        m = block.ssm_mixer
        if m is None or isinstance(m, nn.Module) and not hasattr(m, "d_state"):
            continue
        for L in (m.__dict__.get("chunk_size", 1) * 2, 1000):
            if cfg.layer == "Mamba1":
                want_f = 9 * m.d_inner * m.d_state + 2 * m.d_inner
            elif cfg.layer == "Mamba2":
                q = min(m.chunk_size, L)
                want_f = 2 * q * (m.d_state * m.ngroups + m.d_ssm) + 4 * m.d_state * m.d_ssm + m.d_ssm
            else:
                q, h = min(m.chunk_size, L), m.nheads
                want_f = 2 * q * (m.d_state * h + m.d_inner) + 4 * m.d_state * m.d_inner \
                    + m.d_inner + 2 * m.d_state * h
            got = ssm_flops_per_token(cfg, L)
            if got != want_f:
                raise Mismatch(f"count: ssm flops/token at L={L} {got} != {want_f} from the mixer")
        break
    if not cfg.n_attention_layers:
        chunk = cfg.mixer_kwargs().get("chunk_size", 1)
        per = [flops_breakdown(cfg, n * chunk).forward for n in (1, 2, 3)]
        if len(set(per)) != 1:
            raise Mismatch(f"count: SSM-only forward FLOPs/token vary with length: {per}")


def build_or_refuse(spec: dict):
    """(model, None) or (None, refusal line); raises Mismatch for an unclear refusal."""
    from mamba_train import build_model
    from mamba_train.errors import MambaTrainError
    from mamba_train.models.config import MambaLMConfig

    try:
        return build_model(MambaLMConfig(**spec), backend="reference"), None
    except MambaTrainError as e:
        msg = str(e)
        if "\n" in msg.strip() or not msg:
            raise Mismatch(f"refusal is not one line: {msg!r}")
        return None, f"{type(e).__name__}: {msg}"
    except Exception as e:  # noqa: BLE001 - any other exception is an unclear refusal
        tb = traceback.extract_tb(e.__traceback__)[-1]
        raise Mismatch(f"unclear refusal {type(e).__name__}: {str(e)[:160]} at "
                       f"{Path(tb.filename).name}:{tb.lineno}") from None


def check(spec: dict, seed: int, tmp: Path) -> str:
    torch.manual_seed(seed)
    model, refusal = build_or_refuse(spec)
    if refusal:
        return f"REFUSED {refusal}"
    model.to(DTYPE)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # exercise the correction bias and the statistics' starting values
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.normal_(std=0.3, generator=g)
    seqlen = int(torch.randint(9, 41, (1,), generator=g))
    ids = torch.randint(0, spec["vocab_size"], (3, seqlen), generator=g)
    attn = model.config.attn_kwargs() if model.config.n_attention_layers else {}
    done = []
    if attn.get("d_conv", 0) == 0:  # attention's conv has no document masks (refused)
        seq_idx = check_docs(model, ids[:2], g)
        done.append("docs")
    else:
        seq_idx = None
    check_slices(model, ids[:2], g, None)
    if seq_idx is not None:
        check_slices(model, ids[:2], g, seq_idx)
    check_causal_and_batch(model, ids, g)
    check_loss_and_ckpt(model, ids[:2], g)
    check_io(model, ids[:2], tmp, g)
    check_init(spec, seed)
    check_counts(model)
    return "PASS" + ("" if done else " (no docs: attention d_conv)")


def run_one(seed: int, verbose: bool = False) -> tuple[str, dict, str | None]:
    r = random.Random(f"model-{seed}")
    spec = draw(r)
    invalid = maybe_invalid(r, spec)
    if DTYPE == torch.float64 and spec.get("moe_cfg", {}).get("impl") == "grouped":
        spec["moe_cfg"]["impl"] = "loop"  # torch._grouped_mm has no fp64 kernel
    with tempfile.TemporaryDirectory() as d:
        try:
            result = check(spec, seed, Path(d))
        except Mismatch as e:
            result = f"FAIL {e}"
        except Exception as e:  # noqa: BLE001 - a crash is a finding
            tb = traceback.extract_tb(e.__traceback__)[-1]
            result = (f"FAIL crash {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                      f" at {Path(tb.filename).name}:{tb.lineno}")
            if verbose:
                traceback.print_exc()
    if invalid and result.startswith("PASS"):
        result += f" (accepted '{invalid}')"
    return result, spec, invalid


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=50)
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--show-spec", action="store_true", help="print each drawn config")
    p.add_argument("--traceback", action="store_true", help="print the traceback of a crash")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    args = p.parse_args(argv)
    global DTYPE
    DTYPE = getattr(torch, args.dtype)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    import logging
    logging.disable(logging.WARNING)

    tally: Counter = Counter()
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        result, spec, invalid = run_one(seed, args.traceback)
        tally[result.split()[0]] += 1
        tag = f" [invalid: {invalid}]" if invalid else ""
        print(f"seed={seed:<4d} {result}{tag}", flush=True)
        if args.show_spec or not result.startswith(("PASS", "REFUSED")):
            print(f"    spec={spec}", flush=True)
    print("SUMMARY " + " ".join(f"{s}={n}" for s, n in sorted(tally.items())))
    return 1 if tally["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
