"""The measuring harness the throughput benchmarks share: the plain loop around mamba_ssm's
``MambaLMHeadModel`` and the timed loop any peer model runs in (arm (a)), ``mamba_train``'s real
path (arm (b)), a run's logged losses, synthetic token shards, the GPU set-up, peak FLOP/s and MFU, and the line format.
``train_throughput.py`` (the CLI), ``fla_arms.py``, ``hf_peer.py``, ``long_context.py``,
``profile_step.py`` and ``kernel_budget.py`` import it; it imports none of them."""

from __future__ import annotations

import csv
import gc
import statistics
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F

SEQ_LEN = 2048
VOCAB = 50277


def global_losses(run_dir: Path) -> dict[int, float]:
    """``train/global_loss`` by step from a run's ``metrics/metrics.csv`` (empty if none)."""
    path = run_dir / "metrics" / "metrics.csv"
    if not path.is_file():
        return {}
    with open(path) as f:
        return {int(r["step"]): float(r["train/global_loss"]) for r in csv.DictReader(f)
                if r.get("train/global_loss")}


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
