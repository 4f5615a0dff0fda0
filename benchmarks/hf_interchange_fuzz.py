"""Randomised interchange check between mamba_train and transformers' own Mamba, Mamba-2 and hybrid
families (CPU, nothing downloaded).

For each family and seed: draw a small but valid transformers config of that family (layer
layout, GQA/MQA/MHA, head dims, rotary, biases, tying, epsilons, Mamba-2/Mamba-1 shapes, conv
kernel, chunk size, dt limits, multipliers, experts and routing, special ids, odd vocabularies),
build it with ``AutoModelForCausalLM.from_config``, randomise every weight, save it, then check

  (a) ``load_model(dir, backend="reference")`` gives transformers' fp32 logits;
  (b) the first loss (without load-balancing terms) equals transformers' loss;
  (c) ``export_hf`` writes exactly the source's tensors (names, shapes, bits), a config.json from
      which transformers rebuilds the same class with the same logits, and the special ids.

A config mamba_train refuses must be refused with one line (a ``MambaTrainError``); anything
else (a crash, a multi-line error, a mismatch) is a FAIL. One line per (family, seed):

  PASS | FAIL <reason> | REFUSED <message>

then a summary. ``python benchmarks/hf_interchange_fuzz.py --seeds 10 --families jamba bamba``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import warnings
from pathlib import Path

import torch

from fuzz_table import outcome, run_table

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

FAMILIES = ("mamba", "mamba2", "nemotron_h", "bamba", "falcon_h1", "granitemoehybrid", "jamba")
LIMITS = ((0.0, float("inf")), (0.001, 0.5), (0.01, 2.0), (0.0, 1.0))


# ------------------------------------------------------------------------------ drawing configs
def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _common(r: random.Random) -> dict:
    vocab = r.choice([r.randrange(40, 140), 8 * r.randrange(6, 16)])
    ids = {k: r.choice([None, r.randrange(vocab)]) for k in ("pad_token_id", "bos_token_id",
                                                              "eos_token_id")}
    if r.random() < 0.15:  # several end-of-sequence ids (instruction-tuned checkpoints)
        ids["eos_token_id"] = [r.randrange(vocab), r.randrange(vocab)]
    return dict(vocab_size=vocab, tie_word_embeddings=r.random() < 0.5,
                initializer_range=r.choice([0.02, 0.01]), **ids)


def _attn(r: random.Random, hidden: int | None = None) -> dict:
    """Heads, kv heads (MQA .. MHA) and head_dim (free unless ``hidden`` fixes it)."""
    heads = r.choice([1, 2, 4] if hidden is None else [h for h in (1, 2, 4) if hidden % h == 0])
    out = dict(num_attention_heads=heads, num_key_value_heads=r.choice(_divisors(heads)))
    if hidden is None:
        out["head_dim"] = r.choice([4, 8, 12, 16])
    return out


def _mamba2(r: random.Random, inner: int) -> tuple[int, int, int]:
    """(heads, head_dim, groups) with heads * head_dim == inner."""
    heads = r.choice([h for h in _divisors(inner) if 2 <= inner // h <= 16] or [1])
    return heads, inner // heads, r.choice(_divisors(heads))


def _pure(r: random.Random) -> dict:
    """The fields transformers' MambaConfig and Mamba2Config share."""
    t_min = r.choice([1e-3, 1e-4, 0.01])
    return dict(hidden_size=r.choice([8, 16, 24, 32, 40]), num_hidden_layers=r.randrange(1, 4),
                state_size=r.choice([1, 4, 8, 16]), expand=r.choice([1, 2, 3]),
                conv_kernel=r.choice([1, 2, 3, 4]), use_bias=r.random() < 0.3,
                use_conv_bias=r.random() < 0.6, time_step_min=t_min,
                time_step_max=r.choice([0.1, 0.05, 2 * t_min]),
                time_step_floor=r.choice([1e-4, 1e-3]), residual_in_fp32=r.random() < 0.5,
                rescale_prenorm_residual=r.random() < 0.3, **_common(r))


def mamba(r: random.Random) -> dict:
    return dict(model_type="mamba", time_step_rank=r.choice(["auto", "auto", 1, 3, 8]),
                time_step_scale=r.choice([1.0, 0.5]),
                time_step_init_scheme=r.choice(["random", "constant"]),
                layer_norm_epsilon=r.choice([1e-5, 1e-6, 1e-3]), **_pure(r))


def mamba2(r: random.Random) -> dict:
    out = _pure(r)
    heads, hd, groups = _mamba2(r, out["expand"] * out["hidden_size"])
    # transformers' Mamba2 uses layer_norm_epsilon in its gated norm too (refused unless 1e-5)
    out.update(model_type="mamba2", num_heads=heads, head_dim=hd, n_groups=groups,
               chunk_size=r.choice([4, 8, 16, 32, 256]), time_step_limit=r.choice(LIMITS),
               time_step_rank=r.choice(["auto", 3]),
               layer_norm_epsilon=1e-5 if r.random() < 0.8 else r.choice([1e-6, 1e-3]))
    return out


def nemotron_h(r: random.Random) -> dict:
    moe = r.random() < 0.5
    syms = "M*-E" if moe else "M*-"
    pattern = "".join(r.choice(syms) for _ in range(r.randrange(2, 7)))
    heads, hd, groups = _mamba2(r, r.choice([24, 32, 48, 64]))
    out = dict(model_type="nemotron_h", hidden_size=r.choice([16, 24, 32]),
               hybrid_override_pattern=pattern, mamba_num_heads=heads, mamba_head_dim=hd,
               n_groups=groups, ssm_state_size=r.choice([4, 8, 16]),
               conv_kernel=r.choice([2, 3, 4]), chunk_size=r.choice([4, 8, 16, 32]),
               time_step_limit=r.choice(LIMITS), use_conv_bias=r.random() < 0.5,
               use_bias=r.random() < 0.3, mamba_proj_bias=r.random() < 0.3,
               attention_bias=r.random() < 0.3, mlp_bias=r.random() < 0.3,
               intermediate_size=r.choice([20, 36, 48]),
               layer_norm_epsilon=r.choice([1e-5, 1e-6, 1e-3]),
               residual_in_fp32=r.random() < 0.5, **_attn(r), **_common(r))
    if moe:
        experts = r.choice([4, 6, 8])
        n_group = r.choice([g for g in _divisors(experts) if experts // g >= 2])
        topk_group = r.randrange(1, n_group + 1)
        out.update(n_routed_experts=experts, n_group=n_group, topk_group=topk_group,
                   num_experts_per_tok=r.randrange(1, topk_group * experts // n_group + 1),
                   moe_intermediate_size=r.choice([12, 24]),
                   moe_shared_expert_intermediate_size=r.choice([16, 40]),
                   norm_topk_prob=r.random() < 0.5, routed_scaling_factor=r.choice([1.0, 2.5]),
                   mlp_bias=r.random() < 0.15)
    if r.random() < 0.15:  # multi-token prediction layers (not used by the causal-LM forward)
        out["num_nextn_predict_layers"] = 1
    return out


def _mamba_fields(r: random.Random, inner: int) -> dict:
    heads, hd, groups = _mamba2(r, inner)
    return dict(mamba_n_heads=heads, mamba_d_head=hd, mamba_n_groups=groups,
                mamba_d_state=r.choice([4, 8, 16]), mamba_d_conv=r.choice([2, 3, 4]),
                mamba_chunk_size=r.choice([4, 8, 16, 32]), mamba_conv_bias=r.random() < 0.6,
                mamba_proj_bias=r.random() < 0.3, time_step_limit=r.choice(LIMITS))


def _rope(r: random.Random, **extra) -> dict:
    return dict(rope_parameters=dict(rope_type="default", rope_theta=r.choice([1e4, 5e5, 100.0]),
                                     **extra))


def bamba(r: random.Random) -> dict:
    hidden, expand, layers = r.choice([16, 24, 32]), r.choice([1, 2]), r.randrange(1, 5)
    out = dict(model_type="bamba", hidden_size=hidden, num_hidden_layers=layers, mamba_expand=expand,
               attn_layer_indices=sorted(r.sample(range(layers), r.randrange(0, layers + 1))),
               intermediate_size=r.choice([20, 36, 48]), rms_norm_eps=r.choice([1e-5, 1e-6, 1e-3]),
               attention_bias=r.random() < 0.3, mlp_bias=r.random() < 0.3,
               z_loss_coefficient=0.0 if r.random() < 0.9 else 1e-4,
               **_mamba_fields(r, expand * hidden), **_attn(r), **_rope(r), **_common(r))
    if r.random() < 0.3:
        out["rope_parameters"]["partial_rotary_factor"] = r.choice([0.25, 0.5, 1.0])
    return out


def falcon_h1(r: random.Random) -> dict:
    hidden, d_ssm = r.choice([16, 24, 32]), r.choice([24, 32, 48, 64])
    bias = r.random() < 0.3
    m = lambda: r.choice([1.0, round(r.uniform(0.5, 1.6), 3)])  # noqa: E731
    out = dict(model_type="falcon_h1", hidden_size=hidden, num_hidden_layers=r.randrange(1, 4),
               mamba_d_ssm=d_ssm, mamba_expand=r.choice([1, 2]),
               mamba_rms_norm=r.random() < 0.5, mamba_norm_before_gate=r.random() < 0.5,
               projectors_bias=bias if r.random() < 0.8 else not bias,
               intermediate_size=r.choice([20, 36, 48]), rms_norm_eps=r.choice([1e-5, 1e-6, 1e-3]),
               attention_bias=r.random() < 0.3, mlp_bias=r.random() < 0.3,
               embedding_multiplier=m(), lm_head_multiplier=m(), attention_in_multiplier=m(),
               attention_out_multiplier=m(), key_multiplier=m(), ssm_in_multiplier=m(),
               ssm_out_multiplier=m(), mlp_multipliers=[m(), m()],
               ssm_multipliers=[m() for _ in range(5)],
               **_mamba_fields(r, d_ssm), **_attn(r), **_rope(r), **_common(r))
    out["mamba_proj_bias"] = bias
    if r.random() < 0.2:  # the width from mamba_expand instead
        out.update(mamba_d_ssm=None, **{**_mamba_fields(r, out["mamba_expand"] * hidden),
                                        "mamba_proj_bias": bias})
    if r.random() < 0.2:
        out["rope_parameters"]["partial_rotary_factor"] = 0.5
    return out


def granitemoehybrid(r: random.Random) -> dict:
    hidden, expand, layers = r.choice([16, 24, 32]), r.choice([1, 2]), r.randrange(1, 5)
    experts = r.choice([0, 0, 2, 4, 5])
    out = dict(model_type="granitemoehybrid", hidden_size=hidden, num_hidden_layers=layers,
               layer_types=[r.choice(["mamba", "attention"]) for _ in range(layers)],
               mamba_expand=expand, num_local_experts=experts,
               num_experts_per_tok=r.randrange(1, max(experts, 1) + 1),
               intermediate_size=r.choice([12, 24]), shared_intermediate_size=r.choice([16, 40]),
               rms_norm_eps=r.choice([1e-5, 1e-6, 1e-3]), attention_bias=r.random() < 0.3,
               embedding_multiplier=r.choice([1.0, 12.0, 3.0]),
               logits_scaling=r.choice([1.0, 2.5, 8.0]),
               residual_multiplier=r.choice([1.0, 0.22, 0.5]),
               attention_multiplier=r.choice([0.0078125, 0.2, 1.0]),
               router_aux_loss_coef=r.choice([0.0, 0.01]),
               position_embedding_type=r.choice([None, "rope", "nope"]),
               **_mamba_fields(r, expand * hidden), **_attn(r, hidden), **_rope(r), **_common(r))
    if r.random() < 0.2:  # read by its attention through getattr(config, "head_dim")
        out["head_dim"] = r.choice([4, 8, 12])
    if r.random() < 0.2:  # ignored by its default RoPE (the whole head rotates)
        out["rope_parameters"]["partial_rotary_factor"] = 0.5
    return out


def jamba(r: random.Random) -> dict:
    layers = r.randrange(1, 7)
    ap = r.randrange(1, layers + 2)
    ep = r.randrange(1, layers + 2)
    experts = r.choice([1, 2, 3, 4])
    hidden = r.choice([16, 24, 32])
    out = dict(model_type="jamba", hidden_size=hidden, num_hidden_layers=layers,
               attn_layer_period=ap, attn_layer_offset=r.randrange(ap),
               expert_layer_period=ep, expert_layer_offset=r.randrange(ep), num_experts=experts,
               num_experts_per_tok=r.randrange(1, experts + 1),
               intermediate_size=r.choice([12, 24, 40]), mamba_d_state=r.choice([4, 8, 16]),
               mamba_d_conv=r.choice([2, 3, 4]), mamba_expand=r.choice([1, 2]),
               mamba_dt_rank=r.choice(["auto", 2, 4, 8]), mamba_conv_bias=r.random() < 0.6,
               mamba_proj_bias=r.random() < 0.3, rms_norm_eps=r.choice([1e-5, 1e-6, 1e-3]),
               router_aux_loss_coef=r.choice([0.0, 0.05]), **_attn(r), **_common(r))
    if r.random() < 0.3:
        out.pop("head_dim")
    return out


DRAW = dict(mamba=mamba, mamba2=mamba2, nemotron_h=nemotron_h, bamba=bamba, falcon_h1=falcon_h1,
            granitemoehybrid=granitemoehybrid, jamba=jamba)


# ------------------------------------------------------------------------------ checks
class Mismatch(Exception):
    pass


def _close(what: str, got: torch.Tensor, want: torch.Tensor, tol: float = 2e-5) -> None:
    scale = max(1.0, float(want.abs().max()))
    err = float((got - want).abs().max())
    if not err <= tol * scale:
        raise Mismatch(f"{what}: max |diff| {err:.3g} (scale {scale:.3g})")


def _hf_forward(model, ids, **kw):
    with torch.no_grad():
        return model(ids, use_cache=False, **kw)


def check(spec: dict, tmp: Path) -> str:
    import transformers
    from safetensors.torch import load_file
    from test_hf_hybrids import _randomise

    from mamba_train.errors import MambaTrainError
    from mamba_train.formats.hf_export import export_hf
    from mamba_train.formats.load import load_model

    spec = dict(spec)
    config = transformers.AutoConfig.for_model(spec.pop("model_type"), **spec)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    _randomise(hf)
    with torch.no_grad():
        for name, buf in hf.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.normal_(std=0.3)
    hf.save_pretrained(tmp / "src")
    vocab = config.vocab_size
    ids = torch.randint(0, vocab, (2, 21), generator=torch.Generator().manual_seed(1))
    try:
        ours = load_model(tmp / "src", backend="reference", device="cpu").eval()
    except MambaTrainError as e:
        msg = str(e)
        if "\n" in msg.strip():
            raise Mismatch(f"refusal on load is not one line: {msg!r}")
        return f"REFUSED load: {type(e).__name__}: {msg}"
    want = _hf_forward(hf, ids).logits
    with torch.no_grad():
        _close("logits", ours(ids).logits[..., :vocab], want)
        # (b) the first loss, without load-balancing terms (transformers adds them only with
        # output_router_logits, and averages them over layers differently)
        for block in ours.backbone.layers:
            if hasattr(block.mlp, "cfg"):
                block.mlp.cfg = {**block.mlp.cfg, "aux_loss_coef": 0.0, "z_loss_coef": 0.0}
        labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)
        _close("loss", ours(ids, labels=labels).loss, _hf_forward(hf, ids, labels=ids).loss, 1e-5)
    ours = load_model(tmp / "src", backend="reference", device="cpu")
    try:
        out = export_hf(ours, tmp / "out")
    except MambaTrainError as e:
        msg = str(e)
        if "\n" in msg.strip():
            raise Mismatch(f"refusal on export is not one line: {msg!r}")
        return f"REFUSED export (loaded fine): {type(e).__name__}: {msg}"
    got_t = load_file(out / "model.safetensors")
    want_t = dict(hf.state_dict())
    if hf.lm_head.weight is hf.get_input_embeddings().weight:
        want_t.pop("lm_head.weight")
    if sorted(got_t) != sorted(want_t):
        raise Mismatch(f"export names: missing {sorted(set(want_t) - set(got_t))[:4]}, "
                       f"extra {sorted(set(got_t) - set(want_t))[:4]}")
    for k, t in want_t.items():
        if got_t[k].shape != t.shape or got_t[k].dtype != t.dtype or not torch.equal(got_t[k], t):
            raise Mismatch(f"export tensor {k} differs")
    again = transformers.AutoModelForCausalLM.from_pretrained(out).float().eval()
    if type(again) is not type(hf):
        raise Mismatch(f"export rebuilds {type(again).__name__}, not {type(hf).__name__}")
    _close("exported logits", _hf_forward(again, ids).logits, want, 0.0)
    raw = json.loads((out / "config.json").read_text())
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if raw.get(k) != getattr(hf.config, k, None):
            raise Mismatch(f"config.json {k}={raw.get(k)} != source {getattr(hf.config, k, None)}")
        a, b = getattr(again.generation_config, k, None), getattr(hf.generation_config, k, None)
        if a != b:
            raise Mismatch(f"generation_config {k}={a} != source {b}")
    return "PASS"


def run_one(family: str, seed: int) -> tuple[str, dict]:
    spec = DRAW[family](random.Random(f"{family}-{seed}"))
    return outcome(lambda d: check(spec, d), Mismatch), spec


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=10, help="seeds per family")
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    p.add_argument("--show-spec", action="store_true", help="print each drawn config")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    import logging
    logging.disable(logging.WARNING)
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()

    return run_table(args.families, range(args.first_seed, args.first_seed + args.seeds),
                     run_one, args.show_spec)


if __name__ == "__main__":
    sys.exit(main())
