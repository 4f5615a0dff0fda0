"""Randomised interchange check between mamba_train and mamba_ssm's own ``MambaLMHeadModel``
(CPU, fp32, mamba_ssm's Triton kernels under Triton's interpreter; nothing downloaded).

For each mixer (``Mamba1`` / ``Mamba2``) and seed: draw a small mamba_ssm ``MambaConfig``
(the mixer's options -- d_state, d_conv, expand, dt_rank, headdim, ngroups, d_ssm, chunk_size,
rmsnorm, norm_before_gate, D_has_hdim, biases, dt_limit, either Mamba-2 kernel path -- attention
layers with their ``attn_cfg`` -- heads, kv heads, head_dim, biases, mlp_dim, causal, softmax
scale, d_conv, rotary --, a gated MLP, RMSNorm or LayerNorm, residual_in_fp32, fused_add_norm,
tying, vocabulary padding), build mamba_ssm's model, move every parameter away from its init,
``save_pretrained`` it, then check

  (a) ``load_model(dir, backend="reference")`` holds mamba_ssm's exact tensors and gives its
      logits;
  (b) ``python -m mamba_train.export format=mamba_ssm`` (``cli/export.py: main``) of that
      directory writes one that ``MambaLMHeadModel.from_pretrained`` loads with the same config,
      the same tensors bit for bit and the same logits;
  (c) ``init_from=<dir>`` (``training/run/init_from.py``, model=source) takes the same config and
      the exact tensors;
  (d) where a transformers family can hold it, ``export_hf`` gives a model transformers runs to
      mamba_ssm's logits (otherwise the refusal is one ``MambaTrainError`` line), and
  (e) that model, saved by transformers, exported with ``format=mamba_ssm`` is mamba_ssm's
      again: its loader accepts the config, the tensors and logits are the source's.

One line per (mixer, seed): ``PASS [notes] | FAIL <reason> | REFUSED <message>``, then a summary.

Needs mamba_ssm's Python sources importable (its CUDA extensions are not needed; e.g. a checkout
of state-spaces/mamba at v2.3.2 on PYTHONPATH) and triton. Mamba-1 layers run mamba_ssm's own
``selective_scan_ref`` and its non-fused path (the CUDA scan has no CPU build). Attention with
``rotary_emb_dim > 0`` needs flash_attn's ``RotaryEmbedding``: pass ``--flash-attn-src`` (a
flash-attention checkout; its two Triton rotary files are used, no CUDA extension), else rotary
is left out of the draw and that is printed.

    python benchmarks/mamba_ssm_interchange_fuzz.py --seeds 10 [--flash-attn-src DIR]
    python benchmarks/mamba_ssm_interchange_fuzz.py --spec '{"d_model": 16, ...}'  # one config
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import random
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

from fuzz_table import outcome, run_table

REPO = Path(__file__).resolve().parents[1]
LAYERS = ("Mamba1", "Mamba2")
LIMITS = ((0.0, float("inf")), (0.001, 0.5), (0.01, 2.0))
FLASH_ROTARY = ("flash_attn/layers/rotary.py", "flash_attn/ops/triton/rotary.py")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


# ------------------------------------------------------------------------------ drawing configs
def _mamba1(r: random.Random, d_model: int) -> dict:
    t_min = r.choice([1e-3, 1e-2])
    return dict(layer="Mamba1", d_state=r.choice([1, 4, 8]), d_conv=r.choice([2, 3, 4]),
                expand=r.choice([1, 2]), dt_rank=r.choice(["auto", 2, 5]),
                dt_min=t_min, dt_max=r.choice([0.1, 4 * t_min]),
                dt_init=r.choice(["random", "constant"]), dt_scale=r.choice([1.0, 0.5]),
                dt_init_floor=r.choice([1e-4, 1e-3]), bias=r.random() < 0.3,
                conv_bias=r.random() < 0.7)


def _mamba2(r: random.Random, d_model: int) -> dict:
    expand = r.choice([1, 2])
    d_inner = expand * d_model
    d_ssm = d_inner if r.random() < 0.75 else r.choice([d for d in (8, 16) if d < d_inner])
    headdim = r.choice([h for h in (4, 8, 16) if d_ssm % h == 0])
    out = dict(layer="Mamba2", d_state=r.choice([4, 8, 16]), d_conv=r.choice([2, 3, 4]),
               expand=expand, headdim=headdim, ngroups=r.choice(_divisors(d_ssm // headdim)),
               chunk_size=r.choice([4, 8, 16, 32]), rmsnorm=r.random() < 0.7,
               norm_before_gate=r.random() < 0.3, D_has_hdim=r.random() < 0.3,
               dt_limit=r.choice(LIMITS), bias=r.random() < 0.3, conv_bias=r.random() < 0.7,
               A_init_range=r.choice([(1, 16), (2, 4)]),
               use_mem_eff_path=r.random() < 0.5)  # mamba_ssm's two forward paths
    if d_ssm != d_inner:  # the rest of the inner width is a gated MLP inside the mixer
        out["d_ssm"] = d_ssm
    return out


def _attn(r: random.Random, d_model: int, rotary: bool) -> dict:
    heads = r.choice([1, 2, 4])
    head_dim = r.choice([None, 4, 8, 12] if d_model % heads == 0 else [4, 8, 12])
    hd = head_dim or d_model // heads
    out = dict(num_heads=heads, num_heads_kv=r.choice(_divisors(heads)), head_dim=head_dim,
               qkv_proj_bias=r.random() < 0.5, out_proj_bias=r.random() < 0.5,
               mlp_dim=r.choice([0, 0, 16]), causal=r.random() < 0.85,
               softmax_scale=r.choice([None, None, 0.3]), d_conv=r.choice([0, 0, 3]))
    if rotary and r.random() < 0.6:
        out.update(rotary_emb_dim=r.choice([hd, hd // 2 // 2 * 2 or 2]),
                   rotary_emb_base=r.choice([10000.0, 500.0]),
                   rotary_emb_interleaved=r.random() < 0.3)
    return out


def draw(layer: str, r: random.Random, rotary: bool) -> dict:
    d_model, n_layer = r.choice([16, 24, 32]), r.randrange(1, 4)
    ssm = (_mamba1 if layer == "Mamba1" else _mamba2)(r, d_model)
    attn_idx = sorted(r.sample(range(n_layer), r.randrange(1, n_layer + 1))) if r.random() < 0.35 else []
    return dict(d_model=d_model, n_layer=n_layer, d_intermediate=r.choice([0, 0, 20, 40]),
                vocab_size=r.choice([r.randrange(40, 140), 8 * r.randrange(6, 16)]),
                ssm_cfg=ssm, attn_layer_idx=attn_idx,
                attn_cfg=_attn(r, d_model, rotary) if attn_idx else {},
                rms_norm=r.random() < 0.7, residual_in_fp32=r.random() < 0.5,
                fused_add_norm=r.random() < 0.5, pad_vocab_size_multiple=r.choice([1, 8, 16]),
                tie_embeddings=r.random() < 0.5)


# ------------------------------------------------------------------------------ checks
class Mismatch(Exception):
    pass


def _close(what: str, got, want, tol: float) -> None:
    scale = max(1.0, float(want.abs().max()))
    err = float((got - want).abs().max())
    if not err <= tol * scale:
        raise Mismatch(f"{what}: max |diff| {err:.3g} (scale {scale:.3g})")


def _same_tensors(what: str, got: dict, want: dict) -> None:
    if sorted(got) != sorted(want):
        raise Mismatch(f"{what} names: missing {sorted(set(want) - set(got))[:4]}, "
                       f"extra {sorted(set(got) - set(want))[:4]}")
    for k, t in want.items():
        g = got[k]
        if g.shape != t.shape or g.dtype != t.dtype or not torch.equal(g, t):
            raise Mismatch(f"{what}: tensor {k} differs")


def _one_line(where: str, e: Exception) -> str:
    msg = str(e)
    if "\n" in msg.strip():
        raise Mismatch(f"refusal on {where} is not one line: {msg!r}")
    return f"{type(e).__name__}: {msg}"


def _json_norm(obj):
    return json.loads(json.dumps(obj))


def check(spec: dict, tmp: Path, seq_len: int) -> str:
    from omegaconf import OmegaConf

    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
    from mamba_train.errors import MambaTrainError
    from mamba_train.formats.hf import STASH_KEY
    from mamba_train.formats.hf_export import export_hf
    from mamba_train.formats.load import load_model
    from mamba_train.training.run.init_from import InitFrom

    torch.manual_seed(0)
    src = MambaLMHeadModel(MambaConfig(**json.loads(json.dumps(spec)))).eval()
    from test_hf_hybrids import _randomise  # every weight away from its init, as the tests do

    _randomise(src)
    src.save_pretrained(str(tmp / "src"))
    want_t = dict(src.state_dict())
    ids = torch.randint(0, spec["vocab_size"], (2, seq_len),
                        generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = src(ids).logits
    # (a) load
    try:
        ours = load_model(tmp / "src", backend="reference", device="cpu").eval()
    except MambaTrainError as e:
        return "REFUSED load: " + _one_line("load", e)
    _same_tensors("loaded", dict(ours.state_dict()), want_t)
    with torch.no_grad():
        _close("logits", ours(ids).logits, want, 2e-5)
    # (b) export format=mamba_ssm through the CLI entry point, read back by mamba_ssm
    _export_mamba_ssm(tmp / "src", tmp / "back")
    back = _mamba_ssm_load(MambaLMHeadModel, tmp / "back")
    if _json_norm(back.config.__dict__) != _json_norm(src.config.__dict__):
        diff = {k: (v, src.config.__dict__.get(k)) for k, v in back.config.__dict__.items()
                if _json_norm(v) != _json_norm(src.config.__dict__.get(k))}
        raise Mismatch(f"exported config differs (export, source): {diff}")
    _same_tensors("exported", dict(back.state_dict()), want_t)
    with torch.no_grad():
        _close("exported logits", back(ids).logits, want, 0.0)
    # (c) init_from=<dir>, model=source
    plan = InitFrom.from_run_config(OmegaConf.create({"init_from": str(tmp / "src")}), None, False)
    if plan.config.to_dict() != ours.config.to_dict():
        raise Mismatch("init_from config differs from load_model's")
    state, _ = plan.take_state()
    if spec["tie_embeddings"]:
        state = {**state, "lm_head.weight": state["backbone.embedding.weight"]}
    _same_tensors("init_from", state, want_t)
    # (d) transformers, where a family holds it
    try:
        out = export_hf(ours, tmp / "hf")
    except MambaTrainError as e:
        return "PASS (hf: refused: " + _one_line("export_hf", e)[:90] + ")"
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(out).float().eval()
    with torch.no_grad():
        _close("transformers logits", hf(ids, use_cache=False).logits, want, 2e-5)
    # (e) and back from a directory transformers itself wrote (no mamba_train_config in it)
    delattr(hf.config, STASH_KEY)
    hf.save_pretrained(tmp / "hf_native")
    _export_mamba_ssm(tmp / "hf_native", tmp / "from_hf")
    again = _mamba_ssm_load(MambaLMHeadModel, tmp / "from_hf")
    _same_tensors("transformers -> mamba_ssm", dict(again.state_dict()), want_t)
    with torch.no_grad():
        _close("transformers -> mamba_ssm logits", again(ids).logits, want, 0.0)
    return f"PASS (hf: {type(hf).__name__})"


def _export_mamba_ssm(src: Path, out: Path) -> None:
    """``python -m mamba_train.export ckpt=src out=out format=mamba_ssm``, in this process."""
    from mamba_train.cli.export import main as export_main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = export_main([f"ckpt={src}", f"out={out}", "format=mamba_ssm"])
    if rc != 0:
        raise Mismatch(f"export format=mamba_ssm of {src.name} exit {rc}: "
                       f"{err.getvalue().strip()[:300]}")


def _mamba_ssm_load(cls, path: Path):
    try:
        return cls.from_pretrained(str(path)).eval()
    except Exception as e:  # noqa: BLE001 - mamba_ssm refusing our directory is the finding
        raise Mismatch(f"mamba_ssm cannot load the export of {path.name}: {type(e).__name__}: "
                       f"{str(e).splitlines()[0][:200]}") from None


def run_one(layer: str, seed: int, rotary: bool, seq_len: int) -> tuple[str, dict]:
    spec = draw(layer, random.Random(f"mamba_ssm-{layer}-{seed}"), rotary)
    return outcome(lambda d: check(spec, d, seq_len), Mismatch), spec


def _flash_rotary(src: str | None) -> bool:
    """Make ``flash_attn.layers.rotary`` importable from a flash-attention checkout's two Triton
    rotary files (its package ``__init__`` needs the CUDA extension, so it is not used)."""
    if src is None:
        return False
    root = Path(tempfile.mkdtemp(prefix="flash_rotary_"))
    for rel in FLASH_ROTARY:
        dst = root / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(src) / rel, dst)
        for parent in dst.relative_to(root).parents:
            (root / parent / "__init__.py").touch()
    sys.path.insert(0, str(root))
    return True


def setup(flash_attn_src: str | None = None) -> bool:
    """Interpreter, CPU shims and mamba_ssm's reference Mamba-1 scan; whether rotary runs."""
    global torch
    rotary = _flash_rotary(flash_attn_src)
    sys.path.insert(0, str(REPO / "tests" / "helpers"))
    sys.path.insert(0, str(REPO / "tests"))
    sys.path.insert(0, str(REPO))
    import mamba_ssm_on_cpu  # noqa: F401  (sets TRITON_INTERPRET before triton is imported)
    import torch

    import mamba_ssm.modules.mamba_simple as mamba_simple
    from mamba_ssm.ops.selective_scan_interface import selective_scan_ref

    mamba_simple.selective_scan_fn = selective_scan_ref  # the CUDA scan has no CPU build
    import mamba_ssm.modules.mha as mha

    return rotary and mha.RotaryEmbedding is not None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=10, help="seeds per mixer")
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--layers", nargs="+", default=list(LAYERS), choices=LAYERS)
    p.add_argument("--seq-len", type=int, default=19)
    p.add_argument("--flash-attn-src", help="a flash-attention checkout (for rotary attention)")
    p.add_argument("--show-spec", action="store_true", help="print each drawn config")
    p.add_argument("--spec", help="check this one MambaConfig (JSON) instead of drawing")
    args = p.parse_args(argv)
    rotary = setup(args.flash_attn_src)
    if not rotary:
        print("NOTE rotary_emb_dim > 0 not drawn: mamba_ssm's MHA needs flash_attn's "
              "RotaryEmbedding (pass --flash-attn-src)", flush=True)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    import logging
    logging.disable(logging.WARNING)
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()

    if args.spec:
        with tempfile.TemporaryDirectory() as d:
            try:
                result = check(json.loads(args.spec), Path(d), args.seq_len)
            except Mismatch as e:
                result = f"FAIL {e}"
        print(result)
        return 0 if result.startswith("PASS") else 1
    return run_table(args.layers, range(args.first_seed, args.first_seed + args.seeds),
                     lambda layer, seed: run_one(layer, seed, rotary, args.seq_len),
                     args.show_spec, width=7)


if __name__ == "__main__":
    sys.exit(main())
