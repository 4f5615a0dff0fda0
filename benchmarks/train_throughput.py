"""Training throughput: mamba_train's real path vs a plain loop around mamba_ssm, same process.

For each model it measures, on one GPU, with the same micro-batch, precision, optimizer and
clipping:
  (a) a plain PyTorch loop around ``mamba_ssm.MambaLMHeadModel`` (bf16 autocast, fp32 params,
      fused AdamW over the same decay groups, clip 1.0, loss on an fp32 copy of the logits --
      the common way such loops are written);
  (b) ``mamba_train.train.train``: LightningModule + Trainer + the configured callbacks and CSV
      logger + the real loader over prepared token shards (synthetic tokens, 50277 vocab).
Steady-state tokens/s = median over timed windows after warm-up; peak GPU memory per arm; MFU
per arm (model FLOPs from ``mamba_train.models.flops``: 6N plus the scan, see its docstring,
over the bf16 peak of the GPU from Lightning's table).

Prints per model and micro-batch a THROUGHPUT line with the same-batch ratio b/a, a BEST line
with each arm's best micro-batch over ``--micro-batches`` (a larger batch is not the same-batch
ratio), and with ``--ablate-graph`` a GRAPH line: (b) vs (b) with ``module.cuda_graph=off``, the
measured gain of the captured step. ``--fla-peer`` adds a PEER line: the same model through
flash-linear-attention's ``fla.models`` in the plain loop, ours/fla beside ours/plain;
``--ssd-kernel-fla`` an SSD line: (b) with ``kernels.ssd=fla`` vs the default
(Mamba-2 models; both in ``fla_arms.py``). ``--hf-peer`` adds a PEER line for transformers' own
class of the model (``NemotronHForCausalLM``, ``Mamba2ForCausalLM``...) in the same plain loop,
``--moe-arms`` MOE lines for a mixture-of-experts model: the grouped experts against the
per-expert loop, captured and eager, MFU on active FLOPs (both in ``hf_peer.py``). Models that
``MambaLMHeadModel`` cannot build (layer patterns: the hybrids) get no arm (a); their ratio is
against transformers. ``--json`` writes everything.

    python benchmarks/train_throughput.py --models mamba-130m mamba2-130m --micro-batches 8 16

Mamba-3 recipes (``--models mamba3-180m mamba3-440m``) get arm (a) from ``mamba3_plain.py``
(mamba_ssm 2.3.2's ``MambaLMHeadModel`` has no Mamba-3 blocks). Every arm also reports its first
step's time (Triton compile and autotune, and the graph capture for (b)).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/fla_arms.py

SEQ_LEN = 2048
VOCAB = 50277


def windows_tok_s(stamps: list[float], tokens_per_step: int, window: int) -> list[float]:
    """tokens/s of each window from synchronized timestamps taken every ``window`` steps."""
    return [tokens_per_step * window / (b - a) for a, b in zip(stamps, stamps[1:])]


def model_config(name: str):
    from hydra import compose, initialize_config_module
    from hydra.utils import instantiate
    with initialize_config_module(config_module="mamba_train.conf", version_base="1.3"):
        cfg = compose("config", overrides=[f"recipe={name}"])
    return instantiate(cfg.model, _convert_="all"), cfg


def plain_loop(name: str, micro_batch: int, warmup: int, windows: int, window: int,
               on_step=None) -> dict:
    """Arm (a). ``on_step(step)``, if given, is called after each optimizer step (profiling)."""
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    cfg, run_cfg = model_config(name)
    torch.manual_seed(0)
    if cfg.layer == "Mamba3":  # mamba_ssm 2.3.2's MambaLMHeadModel has no Mamba3 blocks
        from mamba3_plain import PlainMamba3LM
        model = PlainMamba3LM(cfg)
    else:
        fields = {k: v for k, v in cfg.to_dict().items() if k in MambaConfig.__dataclass_fields__}
        model = MambaLMHeadModel(MambaConfig(**fields), device="cuda")

    def loss_of(m, x):  # loss on an fp32 copy of the logits
        logits = m(x[:, :-1]).logits
        return F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())

    return timed_loop(model, float(run_cfg.optim.lr), micro_batch, warmup, windows, window,
                      loss_of, on_step)


def timed_loop(model, lr: float, micro_batch: int, warmup: int, windows: int, window: int,
               loss_of, on_step=None) -> dict:
    """A plain training loop around ``model`` (bf16 autocast, fused AdamW over our decay groups,
    clip 1.0); ``loss_of(model, tokens)`` gives the loss of a (micro_batch, SEQ_LEN + 1) batch."""
    from mamba_train.models import norm_backward
    from mamba_train.training.step.optim import param_groups

    norm_backward.uninstall()  # a plain loop runs mamba_ssm's own kernels
    groups = [{k: v for k, v in g.items() if k != "param_names"} for g in param_groups(model, 0.1)]
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    torch.cuda.reset_peak_memory_stats()
    stamps, losses = [], []
    steps = warmup + windows * window
    t_start = time.perf_counter()
    for step in range(steps + 1):
        x = torch.randint(0, VOCAB, (micro_batch, SEQ_LEN + 1), device="cuda", generator=gen)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_of(model, x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if on_step is not None:
            on_step(step)
        if step == 0:  # the first step: Triton compile + autotune
            torch.cuda.synchronize()
            first_step_s = time.perf_counter() - t_start
        if step >= warmup and (step - warmup) % window == 0:
            torch.cuda.synchronize()
            stamps.append(time.perf_counter())
            losses.append(loss.item())
    tok = windows_tok_s(stamps, micro_batch * SEQ_LEN, window)
    result = {"tok_s": statistics.median(tok) if tok else float("nan"), "windows": tok,
              "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30, "losses": losses,
              "first_step_s": first_step_s}
    del model, opt
    torch.cuda.empty_cache()
    return result


class StepTimer(L.Callback):
    """Synchronised timestamps every ``window`` optimizer steps after ``warmup`` (accumulation 1),
    and the peak memory seen after each backward (other callbacks may reset the peak counter)."""

    def __init__(self, warmup: int, window: int):
        self.warmup, self.window = warmup, window
        self.stamps: list[float] = []
        self.peak = 0
        self.first_step_s = None

    def on_train_start(self, trainer, pl_module):
        self.t_start = time.perf_counter()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.peak = max(self.peak, torch.cuda.max_memory_allocated())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        self.peak = max(self.peak, torch.cuda.max_memory_allocated())
        if self.first_step_s is None:  # the first step: Triton compile + autotune (+ capture)
            torch.cuda.synchronize()
            self.first_step_s = time.perf_counter() - self.t_start
        if step >= self.warmup and (step - self.warmup) % self.window == 0:
            torch.cuda.synchronize()
            self.stamps.append(time.perf_counter())


def synthetic_shards(root: Path, train_tokens: int = 40_000_000, val_tokens: int = 100_000,
                     vocab: int = VOCAB) -> Path:
    """Uniform random tokens (GPT-NeoX vocabulary by default) as prepared train/val shards."""
    from mamba_train.data.shards import write_tokens
    rng = np.random.default_rng(0)
    tok = {"name": "synthetic", "vocab_size": vocab, "eos_id": 0}
    write_tokens(root / "train", rng.integers(1, vocab, train_tokens, dtype=np.uint16), tok)
    write_tokens(root / "val", rng.integers(1, vocab, val_tokens, dtype=np.uint16), tok, split="val")
    return root


def framework(name: str, micro_batch: int, warmup: int, windows: int, window: int,
              data_dir: Path, out_dir: Path, extra: list[str], tag: str = "",
              extra_callbacks: tuple = ()) -> dict:
    from hydra import compose, initialize_config_module

    from mamba_train.train import train

    steps = warmup + windows * window + 1
    overrides = [
        f"recipe={name}", f"data.path={data_dir}", "data.tokenizer=null", "data.num_workers=2",
        f"data.micro_batch_size={micro_batch}", f"train.global_batch_tokens={micro_batch * SEQ_LEN}",
        f"trainer.max_steps={steps}", "trainer.limit_val_batches=0", "train.val_every_n_steps=100000",
        "train.checkpoint_every_n_steps=100000", "callbacks.model_checkpoint.save_last=false",
        f"paths.output_dir={out_dir}", f"run_name={name}-mb{micro_batch}{tag}", *extra,
    ]
    with initialize_config_module(config_module="mamba_train.conf", version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    timer = StepTimer(warmup, window)
    torch.cuda.reset_peak_memory_stats()
    train(cfg, extra_callbacks=[timer, *extra_callbacks])
    tok = windows_tok_s(timer.stamps, micro_batch * SEQ_LEN, window)
    result = {"tok_s": statistics.median(tok) if tok else float("nan"), "windows": tok,
              "peak_mem_gib": max(timer.peak, torch.cuda.max_memory_allocated()) / 2**30,
              "first_step_s": timer.first_step_s}
    # Finalise this run's loader iterators (and their worker processes) before the next run
    # forks new workers: a stale iterator collected inside a forked child breaks it.
    gc.collect()
    torch.cuda.empty_cache()
    return result


def plain_problem(cfg) -> str | None:
    """Why arm (a) cannot build this model (None where it can): mamba_ssm's ``MambaLMHeadModel``
    stacks mixer (+ gated MLP) blocks; it has no layer patterns with MLP/MoE sublayers."""
    if cfg.layer_pattern:
        return "mamba_ssm's MambaLMHeadModel has no layer patterns (hybrid sublayers)"
    return None


def ready_cuda() -> bool:
    """The GPU set-up both arms share; False, with a message, where there is no CUDA."""
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return False
    torch.backends.cuda.matmul.allow_tf32 = True
    return True


def peak_bf16_flops(override: float | None) -> float | None:
    """Dense bf16 peak FLOP/s of this GPU: ``override``, else Lightning's table (None if absent)."""
    if override:
        return override
    from lightning.fabric.utilities.throughput import get_available_flops
    return get_available_flops(torch.device("cuda"), torch.bfloat16)


def mfu(tok_s: float, flops_per_token: int, peak: float | None) -> float | None:
    return tok_s * flops_per_token / peak if peak else None


def _fmt_arm(r: dict) -> str:
    m = f", MFU {r['mfu']:.1%}" if r.get("mfu") is not None else ""
    if r.get("first_step_s") is not None:
        m += f", first step {r['first_step_s']:.1f} s"
    return f"{r['tok_s']:,.0f} tok/s ({r['peak_mem_gib']:.1f} GiB{m})"


def fla_lines(args, name: str, same_mb: dict, entry: dict, timing, data, runs, add_mfu) -> None:
    """The fla peer arm (PEER line) and the fla SSD kernel arm (SSD line), where asked for."""
    from fla_arms import fla_peer_loop, ssd_kernel_arm

    mb, ours, plain = args.micro_batches[0], same_mb["mamba_train"], same_mb["plain"]
    if args.fla_peer:
        c = fla_peer_loop(name, mb, *timing)
        add_mfu(c)
        entry["fla_peer"] = c
        print(f"PEER {name} mb={mb}: fla {_fmt_arm(c)} | mamba_train {_fmt_arm(ours)} | ours/fla "
              f"{ours['tok_s'] / c['tok_s']:.2f} | ours/plain {ours['tok_s'] / plain['tok_s']:.2f}",
              flush=True)
    if args.ssd_kernel_fla and model_config(name)[0].layer == "Mamba2":
        from mamba_train.models.ssd_fla import fla_stack_problem
        if fla_stack_problem():
            print(f"SSD {name} mb={mb}: kernels.ssd=fla not run: {fla_stack_problem()}", flush=True)
            return
        c = ssd_kernel_arm(name, mb, timing, data, runs, args.override)
        add_mfu(c)
        entry["ssd_kernel_fla"] = c
        print(f"SSD {name} mb={mb}: kernels.ssd=fla {_fmt_arm(c)} | kernels.ssd=mamba_ssm "
              f"{_fmt_arm(ours)} | fla/mamba_ssm {c['tok_s'] / ours['tok_s']:.2f}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["mamba-130m", "mamba-370m", "mamba2-130m", "mamba2-370m"])
    ap.add_argument("--micro-batches", nargs="+", type=int, default=[8],
                    help="the first is the same-batch comparison; all are searched for each arm's best")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--windows", type=int, default=3)
    ap.add_argument("--window", type=int, default=8)
    ap.add_argument("--ablate-graph", action="store_true",
                    help="also run (b) with module.cuda_graph=off at the first micro-batch")
    ap.add_argument("--fla-peer", action="store_true",
                    help="also run the same model through fla.models in the plain loop "
                         "(first micro-batch; benchmarks/fla_arms.py)")
    ap.add_argument("--ssd-kernel-fla", action="store_true",
                    help="also run (b) with kernels.ssd=fla for Mamba-2 models")
    ap.add_argument("--hf-peer", action="store_true",
                    help="also run transformers' own class of the model in the plain loop "
                         "(first micro-batch; benchmarks/hf_peer.py)")
    ap.add_argument("--hf-attn", default="sdpa", help="the transformers peer's attn_implementation")
    ap.add_argument("--moe-arms", action="store_true",
                    help="mixture-of-experts models: also mamba_train with model.moe_cfg.impl=loop "
                         "and with the grouped experts eager (MOE lines)")
    ap.add_argument("--peak-flops", type=float, default=None,
                    help="dense bf16 FLOP/s of the GPU for MFU where Lightning's table lacks it "
                         "(e.g. 989e12 for an H200 that reports itself as just 'NVIDIA H200')")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--override", action="append", default=[], help="extra Hydra override for arm (b)")
    args = ap.parse_args(argv)
    if not ready_cuda():
        return 2
    from mamba_train.models.flops import flops_per_token

    peak = peak_bf16_flops(args.peak_flops)
    results = {"device": torch.cuda.get_device_name(), "micro_batches": args.micro_batches,
               "peak_bf16_flops": peak, "date": time.strftime("%Y-%m-%d"), "models": {}}
    timing = (args.warmup, args.windows, args.window)
    with tempfile.TemporaryDirectory() as tmp:
        data, runs = synthetic_shards(Path(tmp) / "data"), Path(tmp) / "runs"
        for name in args.models:
            fpt = flops_per_token(model_config(name)[0], SEQ_LEN)
            if plain_problem(model_config(name)[0]):
                from hf_peer import without_plain
                results["models"][name] = without_plain(
                    args, name, fpt, timing, data, runs,
                    lambda r: r.update(mfu=mfu(r["tok_s"], fpt, peak)), _fmt_arm)
                continue
            per_mb = {}
            for mb in args.micro_batches:
                a = plain_loop(name, mb, *timing)
                print(f"PLAIN {name} mb={mb}: {_fmt_arm(a)} windows {[round(w) for w in a['windows']]}",
                      flush=True)
                b = framework(name, mb, *timing, data, runs, args.override)
                for r in (a, b):
                    r["mfu"] = mfu(r["tok_s"], fpt, peak)
                per_mb[mb] = {"plain": a, "mamba_train": b, "ratio": b["tok_s"] / a["tok_s"]}
                print(f"THROUGHPUT {name} mb={mb}: plain {_fmt_arm(a)} | mamba_train {_fmt_arm(b)} "
                      f"| ratio b/a {b['tok_s'] / a['tok_s']:.2f}", flush=True)
            entry = {"flops_per_token": fpt, "micro_batches": per_mb}
            best = {arm: max(per_mb, key=lambda mb: per_mb[mb][arm]["tok_s"])
                    for arm in ("plain", "mamba_train")}
            entry["best"] = {arm: {"micro_batch": mb, **per_mb[mb][arm]} for arm, mb in best.items()}
            print(f"BEST {name}: plain mb={best['plain']} {_fmt_arm(per_mb[best['plain']]['plain'])} | "
                  f"mamba_train mb={best['mamba_train']} "
                  f"{_fmt_arm(per_mb[best['mamba_train']]['mamba_train'])}", flush=True)
            if args.ablate_graph:
                mb = args.micro_batches[0]
                c = framework(name, mb, *timing, data, runs,
                              [*args.override, "module.cuda_graph=off"], tag="-eager")
                c["mfu"] = mfu(c["tok_s"], fpt, peak)
                b = per_mb[mb]["mamba_train"]
                entry["eager_step"] = c
                print(f"GRAPH {name} mb={mb}: cuda_graph=auto {_fmt_arm(b)} | cuda_graph=off "
                      f"{_fmt_arm(c)} | gain {b['tok_s'] / c['tok_s']:.2f}", flush=True)
            fla_lines(args, name, per_mb[args.micro_batches[0]], entry, timing, data, runs,
                      lambda r: r.update(mfu=mfu(r["tok_s"], fpt, peak)))
            if args.hf_peer:
                from hf_peer import hf_peer_arm
                hf_peer_arm(args, name, per_mb[args.micro_batches[0]]["mamba_train"], entry,
                            timing, lambda r: r.update(mfu=mfu(r["tok_s"], fpt, peak)), _fmt_arm)
            results["models"][name] = entry
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
