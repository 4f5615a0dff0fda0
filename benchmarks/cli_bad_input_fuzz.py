"""Bad input through the real command lines: does each one end in one clear line, and does it
leave what was already written alone?

    PYTHONPATH=$PWD python benchmarks/cli_bad_input_fuzz.py [-k substring] [--json out.json]

Every case is one subprocess of a real entry (``python -m mamba_train``, ``.data.prepare``,
``.eval``, ``.export``, ``.lm_eval``) on a tiny model and one step, with a timeout. A case that
expects an error is GOOD when the process exits non-zero with exactly one ``error:`` line, that
line is the last non-empty line of stderr, names what the case says it must (the key, file or
value), is not a bare Python exception text (``KeyError: 'x'``, an ``AssertionError``), and
there is no traceback and no Hydra ``HYDRA_FULL_ERROR`` wrapper. A case may protect a directory
(an existing run, prepared data, an export target): any file added, removed or changed there
makes it BAD. ``expect="ok"`` cases are baselines (the case setup itself works) or inputs that
are odd but valid. The fixtures (a trained run, prepared data of two vocabularies, damaged
checkpoints and shards) are built once under a temporary directory.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# a ~0.15M-parameter Mamba-1 (the 4096-token embedding aside), one step on the CPU
TINY = ["model.d_model=32", "model.n_layer=1", "data.seq_len=32", "data.micro_batch_size=2",
        "train.global_batch_tokens=64", "data.num_workers=0", "trainer.limit_val_batches=1",
        "train.val_every_n_steps=1000", "callbacks.progress_bar=null", "callbacks.samples=null",
        "trainer.enable_model_summary=false", "logger=csv", "trainer.max_steps=1",
        "trainer.accelerator=cpu"]
# sizes at which the hybrid / MoE / Mamba-3 debug recipes still build (head_dim >= rotary dim)
HYBRID = ["model.d_model=128", "model.n_layer=2", "model.attn_layer_idx=[1]"]
MOE = ["model.d_model=128", "model.n_layer=3", "model.layer_pattern=M*EM",
       "model.attn_cfg.head_dim=32"]
BARE_EXCEPTION = re.compile(r"\b(KeyError|TypeError|AssertionError|IndexError|AttributeError|"
                            r"ZeroDivisionError|UnpicklingError|NotImplementedError|"
                            r"MisconfigurationException|InstantiationException)\b")
ERROR_LINE = re.compile(r"^(\S+: )?error: ")


@dataclass
class Case:
    id: str
    args: list[str]  # {fx} (fixtures) and {out} (this case's own directory) are filled in
    names: tuple[str, ...] = ()  # what the error line must contain, each of them
    cli: str = "train"  # train | prepare | eval | export | lm_eval
    expect: str = "error"  # error | ok
    recipe: str = "debug"
    protect: str | None = None  # a directory that must stay byte-identical
    setup: str | None = None  # "run": a copy of the trained run at {out}/debug first
    timeout: int = 180
    extra: list[str] = field(default_factory=list)


def T(id_, *args, names=(), **kw) -> Case:
    return Case(id_, list(args), tuple(names), **kw)


def train_cases() -> list[Case]:
    c = [T("baseline", expect="ok")]
    c += [T("baseline-hybrid", *HYBRID, recipe="debug-hybrid", expect="ok")]
    c += [T("baseline-moe", *MOE, recipe="debug-nemotron-moe", expect="ok")]
    # numbers: batch arithmetic
    for key, values in {
        "data.micro_batch_size": ["0", "1.5"],
        "data.seq_len": ["-32", "1e9"],
        "train.global_batch_tokens": ["-64", "abc"],
        "optim.lr": ["0", "nan", "inf"],
        "optim.weight_decay": ["-0.1", "abc"],
        "trainer.gradient_clip_val": ["-1", "abc", "inf"],
        "trainer.max_steps": ["-5", "1.5"],
        "trainer.log_every_n_steps": ["0", "abc"],
        "train.val_every_n_steps": ["0"],
        "train.checkpoint_every_n_steps": ["0", "abc"],
        "train.keep_last_k_checkpoints": ["-2"],
        "train.total_tokens": ["-5"],
        "data.num_workers": ["-1", "abc"],
        "seed": ["abc"],
        "module.loss_chunk_size": ["0"],
        "module.max_consecutive_skips": ["0"],
        "trainer.num_nodes": ["0", "abc"],
        "trainer.devices": ["0", "abc"],
        "trainer.limit_val_batches": ["-1", "abc"],
        "data.val_seq_len": ["0"],
        "data.val_windows": ["-1"],
    }.items():
        for v in values:
            c.append(T(f"{key}={v}", f"{key}={v}", names=(key,)))
    c += [
        T("global_batch not divisible", "train.global_batch_tokens=100", names=("global_batch_tokens",)),
        T("warmup_steps > max_steps", "scheduler.warmup_steps=50", names=("scheduler.warmup_steps",)),
        T("warmup_fraction > 1", "scheduler.warmup_fraction=1.5", names=("scheduler.warmup_fraction",)),
        T("warmup_fraction < 0", "scheduler.warmup_fraction=-0.1", names=("scheduler.warmup_fraction",)),
        T("min_lr < 0", "scheduler.min_lr=-1", names=("scheduler.min_lr",)),
        # a floor above the peak is capped at the peak (a continued run may peak below 1e-5)
        T("min_lr > lr", "scheduler.min_lr=1.0", expect="ok"),
        T("activation_checkpointing_k=0", "module.activation_checkpointing=every_k",
          "module.activation_checkpointing_k=0", names=("activation_checkpointing_k",)),
        T("wsd decay_fraction > 1", "scheduler=wsd", "scheduler.decay_fraction=2", names=("decay_fraction",)),
        T("wsd decay_shape", "scheduler=wsd", "scheduler.decay_shape=cubic", names=("decay_shape",)),
        T("optim betas garbage", "optim.optimizer.betas=[0.9]", names=("optim.optimizer",)),
        T("optim eps negative", "optim.optimizer.eps=-1", names=("optim.optimizer", "epsilon")),
        # strings with a fixed set of values
        T("trainer.precision=bf17", "trainer.precision=bf17", names=("precision",)),
        T("precision group unknown", "precision=fp8", names=("precision",)),
        T("trainer.accelerator=gpu on CPU", "trainer.accelerator=gpu", names=("accelerator",)),
        T("trainer.accelerator=tpuu", "trainer.accelerator=tpuu", names=("accelerator",)),
        T("backend=bogus", "backend=bogus", names=("backend",)),
        T("backend=fused on CPU", "backend=fused", names=("backend",)),
        T("kernels.ssd=bogus", "kernels.ssd=bogus", names=("kernels.ssd",)),
        T("kernels.norm_backward=x", "kernels.norm_backward=x", names=("kernels.norm_backward",)),
        T("kernels.mamba1_recompute=maybe", "kernels.mamba1_recompute=maybe", names=("mamba1_recompute",)),
        T("module.nan_policy=ignore", "module.nan_policy=ignore", names=("nan_policy",)),
        T("module.cuda_graph=maybe", "module.cuda_graph=maybe", names=("cuda_graph",)),
        T("activation_checkpointing=sometimes", "module.activation_checkpointing=sometimes",
          names=("activation_checkpointing",)),
        T("strategy group unknown", "strategy=megatron", names=("strategy",)),
        T("strategy.name bogus", "strategy.name=bogus", names=("strategy",)),
        T("fsdp2 cp=3 on 1 device", "strategy=fsdp2", "strategy.context_parallel_size=3",
          names=("context_parallel_size",)),
        T("fsdp2 cp=0", "strategy=fsdp2", "strategy.context_parallel_size=0", names=("context_parallel_size",)),
        T("fsdp2 cp=abc", "strategy=fsdp2", "strategy.context_parallel_size=abc",
          names=("context_parallel_size",)),
        T("fsdp2 state_dict_type", "strategy=fsdp2", "strategy.state_dict_type=half",
          names=("state_dict_type",)),
        T("ddp option typo", "strategy=ddp", "+strategy.find_unused=true", names=("find_unused",)),
        T("deepspeed on CPU", "strategy=deepspeed_zero2", names=("deepspeed",)),
        # names that do not exist
        T("recipe unknown", names=("recipe",), recipe="mamba-9000"),
        T("model group unknown", "model=mamba-9000", names=("model",)),
        T("optim.lrr typo", "optim.lrr=1e-3", names=("optim.lrr",)),
        T("trainer key typo with +", "+trainer.max_stepz=3", names=("max_stepz",)),
        T("data key typo", "data.seq_length=64", names=("data.seq_length",)),
        T("logger unknown", "logger=mlflow", names=("logger",)),
        T("type: max_steps list", "trainer.max_steps=[1,2]", names=("max_steps",)),
        T("type: seq_len dict", "data.seq_len={a:1}", names=("seq_len",)),
        T("ckpt_path=123", "ckpt_path=123", names=("ckpt_path",)),
        # models that cannot be built
        T("model.d_model=abc", "model.d_model=abc", names=("d_model",)),
        T("model.d_model=0", "model.d_model=0", names=("d_model",)),
        T("model.d_model=-64", "model.d_model=-64", names=("d_model",)),
        T("model.n_layer=0", "model.n_layer=0", names=("n_layer",)),
        T("model.n_layer=-1", "model.n_layer=-1", names=("n_layer",)),
        T("model.vocab_size=0", "model.vocab_size=0", names=("vocab_size",)),
        T("model.vocab_size=100 < data", "model.vocab_size=100", names=("vocab_size",)),
        T("model.d_intermediate=-1", "model.d_intermediate=-1", names=("d_intermediate",)),
        T("model.pad_vocab_size_multiple=0", "model.pad_vocab_size_multiple=0",
          names=("pad_vocab_size_multiple",)),
        T("model.norm_epsilon=-1", "model.norm_epsilon=-1", names=("norm_epsilon",)),
        T("ssm_cfg.layer=Mamba4", "model.ssm_cfg.layer=Mamba4", names=("ssm_cfg.layer",)),
        T("ssm_cfg typo", "+model.ssm_cfg.d_statee=16", names=("d_statee",)),
        T("ssm_cfg.d_state=0", "model.ssm_cfg.d_state=0", names=("d_state",)),
        T("ssm_cfg.d_state=abc", "model.ssm_cfg.d_state=abc", names=("d_state",)),
        T("ssm_cfg.d_conv=0", "+model.ssm_cfg.d_conv=0", names=("d_conv",)),
        T("ssm_cfg.expand=0", "+model.ssm_cfg.expand=0", names=("expand",)),
        T("mamba2 headdim not dividing", "model.ssm_cfg.headdim=7", names=("headdim",),
          recipe="debug-mamba2"),
        T("mamba2 chunk_size=3", "model.ssm_cfg.chunk_size=3", names=("chunk_size",), recipe="debug-mamba2"),
        T("mamba2 ngroups=3", "+model.ssm_cfg.ngroups=3", names=("ngroups",), recipe="debug-mamba2"),
        T("mamba3 headdim not dividing", "model.ssm_cfg.headdim=7", names=("headdim",),
          recipe="debug-mamba3"),
        T("attn heads not dividing", *HYBRID, "model.attn_cfg.num_heads=3", names=("num_heads",),
          recipe="debug-hybrid"),
        T("attn_layer_idx out of range", "model.d_model=128", "model.n_layer=2",
          "model.attn_layer_idx=[5]", names=("attn_layer_idx",), recipe="debug-hybrid"),
        T("attn causal false", *HYBRID, "model.attn_cfg.causal=false", names=("causal",),
          recipe="debug-hybrid"),
        T("attn_cfg typo", *HYBRID, "+model.attn_cfg.num_head=4", names=("num_head",), recipe="debug-hybrid"),
        T("layer_pattern garbage", "+model.layer_pattern=MXQ", names=("layer_pattern",)),
        T("layer_pattern vs n_layer", "+model.layer_pattern=M-M-", "model.n_layer=3",
          names=("layer_pattern",)),
        T("moe top_k > n_experts", *MOE, "model.moe_cfg.top_k=99", names=("top_k",),
          recipe="debug-nemotron-moe"),
        T("moe n_experts=0", *MOE, "model.moe_cfg.n_experts=0", names=("n_experts",),
          recipe="debug-nemotron-moe"),
        T("moe_cfg typo", *MOE, "+model.moe_cfg.topk=2", names=("topk",), recipe="debug-nemotron-moe"),
        T("mlp act unknown", "+model.d_intermediate=64", "+model.mlp_cfg.act=gelu9", names=("act",)),
        T("model top-level typo", "+model.d_modell=64", names=("d_modell",)),
        T("model too large", "model.d_model=1000000", names=("d_model",)),
        # data
        T("data.path missing", "data.path={fx}/nope", names=("nope",)),
        T("data.path empty dir", "data.path={fx}/empty_dir", names=("empty_dir",)),
        T("data.path is a file", "data.path={fx}/docs.jsonl", names=("docs.jsonl",)),
        T("data corrupt index.json", "data.path={fx}/data_bad_index", names=("index.json",)),
        T("data truncated shard", "data.path={fx}/data_short_shard", names=("shard_00000.bin",)),
        T("data other vocab, model.vocab_size explicit", "data.path={fx}/data_v300",
          "model.vocab_size=4096", names=("vocab_size",)),
        T("data other vocab adopted", "data.path={fx}/data_v300", expect="ok"),
        T("data other vocab, data.tokenizer explicit", "data.path={fx}/data_v300",
          "data.tokenizer=default", names=("tokenizer",)),
        T("data.tokenizer unknown", "data.tokenizer={fx}/nope_tok", names=("nope_tok",)),
        T("data.sources missing path", "data.sources=[{path:{fx}/nope,weight:1}]", names=("nope",)),
        T("data.sources negative weight",
          "data.sources=[{path:{fx}/data_4096,weight:-1},{path:{fx}/data_4096,weight:1}]",
          names=("weight",)),
        T("data.sources not a list", "data.sources=abc", names=("data.sources",)),
        # init_from
        T("init_from missing dir", "init_from={fx}/nope", names=("init_from", "nope")),
        T("init_from not a model dir", "init_from={fx}/not_a_model", names=("init_from",)),
        T("init_from other vocab", "init_from={fx}/model_v300", names=("vocab",)),
        T("init_from junk ckpt", "init_from={fx}/junk.ckpt", names=("junk.ckpt",)),
        T("init_from truncated ckpt", "init_from={fx}/trunc.ckpt", names=("trunc.ckpt",)),
        # ckpt_path
        T("ckpt_path missing", "ckpt_path={fx}/nope.ckpt", names=("nope.ckpt",)),
        T("ckpt_path junk", "ckpt_path={fx}/junk.ckpt", names=("junk.ckpt",)),
        T("ckpt_path truncated", "ckpt_path={fx}/trunc.ckpt", names=("trunc.ckpt",)),
        T("ckpt_path other model", "ckpt_path={fx}/other_model.ckpt", names=("model.d_model",)),
        T("ckpt_path a directory", "ckpt_path={fx}/empty_dir", names=("empty_dir",)),
        T("ckpt_path=last, no run", "ckpt_path=last", expect="ok"),
        # where the run goes
        T("output_dir under a file", "paths.output_dir={fx}/docs.jsonl/sub", names=("docs.jsonl",)),
        T("run_dir under a file", "run_dir={fx}/docs.jsonl/run", names=("docs.jsonl",)),
        T("run_dir read-only fs", "run_dir=/proc/mt_run", names=("/proc/mt_run",)),
        # an existing run: nothing in it may change
        T("fresh run over an existing run", names=("ckpt_path=last",), setup="run", protect="{out}/debug"),
        T("resume: model change refused", "ckpt_path=last", "model.d_model=48", names=("d_model",),
          setup="run", protect="{out}/debug"),
        T("resume by name: model change", "resume=debug", "model.n_layer=2", names=("n_layer",),
          setup="run", protect="{out}/debug"),
        T("resume unknown name", "resume=nope", names=("nope",)),
    ]
    for key, v in (("trainer.log_every_n_steps", "0"), ("train.val_every_n_steps", "0"),
                   ("train.checkpoint_every_n_steps", "-1"), ("data.num_workers", "-1"),
                   ("trainer.max_steps", "abc"), ("trainer.devices", "0"),
                   ("train.keep_last_k_checkpoints", "-5"), ("strategy", "megatron"),
                   ("kernels.ssd", "bogus"), ("trainer.precision", "bf17"),
                   ("data.micro_batch_size", "3"), ("strategy.context_parallel_size", "0"),
                   ("optim.lrr", "1"), ("backend", "bogus"), ("trainer.max_steps", "1")):
        prefix = "+" if key == "strategy.context_parallel_size" else ""
        c.append(T(f"resume: {key}={v}", "ckpt_path=last", f"{prefix}{key}={v}",
                   names=(key.split(".")[-1],), setup="run", protect="{out}/debug"))
    c[-1].names = ("max_steps",)  # a resume with max_steps at the checkpoint's step: nothing to do
    return c


def other_cases() -> list[Case]:
    P = lambda id_, *a, **kw: T("prepare: " + id_, *a, cli="prepare", **kw)  # noqa: E731
    E = lambda id_, *a, **kw: T("eval: " + id_, *a, cli="eval", **kw)  # noqa: E731
    X = lambda id_, *a, **kw: T("export: " + id_, *a, cli="export", **kw)  # noqa: E731
    L = lambda id_, *a, **kw: T("lm_eval: " + id_, *a, cli="lm_eval", **kw)  # noqa: E731
    out = "out={out}/p"
    good = "ckpt={fx}/run/debug/checkpoints/last.ckpt"
    lm = ["--model", "mamba_train", "--tasks", "mamba_train_local", "--limit", "1"]
    return [
        P("no arguments", names=("source=",)),
        P("missing source", "source={fx}/nope.jsonl", out, names=("nope.jsonl",)),
        P("empty file", "source={fx}/empty.jsonl", out, names=("empty.jsonl",)),
        P("binary garbage .jsonl", "source={fx}/garbage.jsonl", out, names=("garbage.jsonl",)),
        P("binary garbage .bin", "source={fx}/garbage.bin", out, names=("garbage.bin",)),
        P("text_key missing", "source={fx}/docs.jsonl", out, "text_key=body", names=("body",)),
        P("unknown tokenizer", "source={fx}/docs.jsonl", out, "tokenizer={fx}/nope_tok", names=("nope_tok",)),
        P("tokenizer hub name offline", "source={fx}/docs.jsonl", out, "tokenizer=nobody/no-such-tok",
          names=("nobody/no-such-tok",)),
        P("out= existing finished data, other tokenizer", "source={fx}/docs.jsonl",
          "out={fx}/data_v300", names=("data_v300",), protect="{fx}/data_v300"),
        P("out= existing finished data, same command", "source={fx}/docs.jsonl", "out={fx}/data_v300",
          "tokenizer={fx}/tok300/tokenizer.json", "num_proc=1", expect="ok", protect="{fx}/data_v300"),
        P("out= a non-data dir", "source={fx}/docs.jsonl", "out={fx}/not_a_model", names=("not_a_model",),
          protect="{fx}/not_a_model"),
        P("out= a file", "source={fx}/docs.jsonl", "out={fx}/docs.jsonl", names=("docs.jsonl",)),
        P("val_fraction=1.5", "source={fx}/docs.jsonl", out, "val_fraction=1.5", names=("val_fraction",)),
        P("val_fraction=abc", "source={fx}/docs.jsonl", out, "val_fraction=abc", names=("val_fraction",)),
        P("num_proc=0", "source={fx}/docs.jsonl", out, "num_proc=0", names=("num_proc",)),
        P("tokens_per_shard=0", "source={fx}/docs.jsonl", out, "tokens_per_shard=0", names=("tokens_per_shard",)),
        P("batch_docs=0", "source={fx}/docs.jsonl", out, "batch_docs=0", names=("batch_docs",)),
        P("max_shards=0", "source={fx}/docs.jsonl", out, "max_shards=0", names=("max_shards",)),
        P("min_val_tokens=-1", "source={fx}/docs.jsonl", out, "min_val_tokens=-1", names=("min_val_tokens",)),
        P("unknown argument", "source={fx}/docs.jsonl", out, "shards=3", names=("shards",)),
        E("missing ckpt", "ckpt={fx}/nope.ckpt", "tasks=local", names=("nope.ckpt",)),
        E("junk ckpt", "ckpt={fx}/junk.ckpt", "tasks=local", "limit=1", names=("junk.ckpt",)),
        E("truncated ckpt", "ckpt={fx}/trunc.ckpt", "tasks=local", "limit=1", names=("trunc.ckpt",)),
        E("not a model dir", "ckpt={fx}/not_a_model", "tasks=local", "limit=1", names=("not_a_model",)),
        E("unknown task", good, "tasks=no_such_task", "limit=1", "device=cpu", names=("no_such_task",)),
        E("no tasks", good, names=("tasks=",)),
        E("batch_size=0", good, "tasks=local", "batch_size=0", "limit=1", names=("batch_size",)),
        E("dtype=float8", good, "tasks=local", "dtype=float8", "limit=1", names=("dtype",)),
        E("backend=bogus", good, "tasks=local", "backend=bogus", "limit=1", names=("backend",)),
        E("device=tpu9", good, "tasks=local", "device=tpu9", "limit=1", names=("device",)),
        E("limit=-1", good, "tasks=local", "limit=-1", names=("limit",)),
        E("unknown argument", good, "tasks=local", "shots=3", names=("shots",)),
        X("missing ckpt", "ckpt={fx}/nope.ckpt", "out={out}/x", "format=hf", names=("nope.ckpt",)),
        X("junk ckpt", "ckpt={fx}/junk.ckpt", "out={out}/x", "format=hf", names=("junk.ckpt",)),
        X("truncated ckpt", "ckpt={fx}/trunc.ckpt", "out={out}/x", "format=mamba_ssm", names=("trunc.ckpt",)),
        X("not a model dir", "ckpt={fx}/not_a_model", "out={out}/x", "format=hf", names=("not_a_model",)),
        X("unknown format", good, "out={out}/x", "format=onnx", names=("format",)),
        X("dtype=int8", good, "out={out}/x", "format=hf", "dtype=int8", names=("dtype",)),
        X("out= dir with other weights (hf)", good, "out={fx}/other_export", "format=hf",
          names=("other_export",), protect="{fx}/other_export"),
        X("out= dir with other weights (mamba_ssm)", good, "out={fx}/other_export", "format=mamba_ssm",
          names=("other_export",), protect="{fx}/other_export"),
        X("out= a file", good, "out={fx}/docs.jsonl", "format=hf", names=("docs.jsonl",),
          protect="{fx}/run"),
        X("tokenizer unknown", good, "out={out}/x", "format=hf", "tokenizer={fx}/nope_tok",
          names=("nope_tok",)),
        X("unknown argument", good, "out={out}/x", "format=hf", "fmt=hf", names=("fmt",)),
        L("missing ckpt", *lm, "--model_args", "pretrained={fx}/nope.ckpt", names=("nope.ckpt",)),
        L("junk ckpt", *lm, "--model_args", "pretrained={fx}/junk.ckpt", names=("junk.ckpt",)),
        L("unknown task", "--model", "mamba_train", "--model_args", "pretrained=" + good[5:],
          "--tasks", "no_such_task", names=("no_such_task",)),
        L("unknown model arg", *lm, "--model_args", f"pretrained={good[5:]},bogus_arg=1",
          names=("bogus_arg",)),
        L("no model_args", *lm, names=("pretrained",)),
    ]


# ----------------------------------------------------------------------------- fixtures
def _cli(cli: str, args: list[str], cwd: Path, timeout: int) -> subprocess.CompletedProcess:
    module = {"train": "mamba_train", "prepare": "mamba_train.data.prepare", "eval": "mamba_train.eval",
              "export": "mamba_train.export", "lm_eval": "mamba_train.lm_eval"}[cli]
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout)


def build_fixtures(fx: Path) -> None:
    """The inputs the cases point at: a trained run, data of two vocabularies, damaged files."""
    sys.path.insert(0, str(REPO))
    import numpy as np
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from mamba_train.cli.prepare import main as prepare_main
    from mamba_train.data.datamodule import ensure_default_data
    from mamba_train.models.config import MambaLMConfig
    from mamba_train.models.lm import MambaLM

    fx.mkdir(parents=True, exist_ok=True)
    words = "the of and to in is was for on that with as by at from his her an which or".split()
    rng = np.random.default_rng(0)
    docs = [" ".join(rng.choice(words, size=int(rng.integers(20, 120)))) for _ in range(150)]
    (fx / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    (fx / "empty.jsonl").write_text("")
    (fx / "garbage.jsonl").write_bytes(bytes(rng.integers(0, 256, 4096, dtype=np.uint8)))
    (fx / "garbage.bin").write_bytes(bytes(rng.integers(0, 256, 4096, dtype=np.uint8)))
    (fx / "empty_dir").mkdir()
    (fx / "not_a_model").mkdir()
    (fx / "not_a_model" / "notes.txt").write_text("my notes\n")
    (fx / "junk.ckpt").write_text("not a checkpoint")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(docs, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    (fx / "tok300").mkdir()
    tok.save(str(fx / "tok300" / "tokenizer.json"))
    assert prepare_main([f"source={fx / 'docs.jsonl'}", f"out={fx / 'data_v300'}",
                         f"tokenizer={fx / 'tok300' / 'tokenizer.json'}", "num_proc=1"]) == 0
    shutil.copytree(ensure_default_data(), fx / "data_4096")
    for name, damage in (("data_bad_index", "index"), ("data_short_shard", "shard")):
        shutil.copytree(fx / "data_4096", fx / name)
        if damage == "index":
            (fx / name / "train" / "index.json").write_text("{not json")
        else:
            shard = fx / name / "train" / "shard_00000.bin"
            shard.write_bytes(shard.read_bytes()[:1001])
    MambaLM(MambaLMConfig(d_model=32, n_layer=1, vocab_size=300), backend="reference").save_pretrained(
        fx / "model_v300")
    other = fx / "other_export"
    MambaLM(MambaLMConfig(d_model=48, n_layer=1, vocab_size=4096), backend="reference").save_pretrained(other)
    (other / "model.safetensors").write_bytes(b"someone else's weights")
    for name, extra in (("run", []), ("other_run", ["model.d_model=48"])):
        proc = _cli("train", ["recipe=debug", *TINY, "trainer.max_steps=2", "train.checkpoint_every_n_steps=1",
                              f"paths.output_dir={fx / name}", *extra], fx, 300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    last = fx / "run" / "debug" / "checkpoints" / "last.ckpt"
    shutil.copy(fx / "other_run" / "debug" / "checkpoints" / "last.ckpt", fx / "other_model.ckpt")
    (fx / "trunc.ckpt").write_bytes(last.read_bytes()[: last.stat().st_size // 2])


# ----------------------------------------------------------------------------- one case
def snapshot(path: Path) -> dict[str, str]:
    if not path.exists():
        return {}
    # prepare's lock file records its latest holder (a pid): not data, and rewritten by design
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file() and p.name != ".prepare.lock"}


def classify(case: Case, proc, changed: list[str]) -> list[str]:
    """Why the case is BAD (empty: GOOD)."""
    text = proc.stdout + proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    bad = [f"changed {', '.join(changed[:4])}"] if changed else []
    if case.expect == "ok":
        if proc.returncode != 0:
            bad.append(f"exit {proc.returncode} on valid input: {lines[-1][:200] if lines else ''}")
        return bad
    if proc.returncode == 0:
        bad.append("exit 0 on bad input")
        return bad
    if "Traceback" in text:
        bad.append("traceback")
    if "HYDRA_FULL_ERROR" in text:
        bad.append("Hydra's wrapper")
    errors = [ln for ln in lines if ERROR_RE_MATCH(ln)]
    if len(errors) != 1:
        bad.append(f"{len(errors)} error lines")
    elif lines[-1] != errors[0]:
        bad.append(f"{len(lines) - lines.index(errors[0]) - 1} lines after the error line")
    msg = errors[-1] if errors else (lines[-1] if lines else "")
    if BARE_EXCEPTION.search(msg):
        bad.append("a bare exception text")
    missing = [n for n in case.names if n not in msg]
    if missing:
        bad.append(f"does not name {missing}")
    return bad


def ERROR_RE_MATCH(line: str) -> bool:
    return bool(ERROR_LINE.match(line))


def run_case(case: Case, fx: Path, root: Path) -> dict:
    out = root / re.sub(r"[^A-Za-z0-9_.-]+", "_", case.id)[:80]
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    fill = lambda s: s.replace("{fx}", str(fx)).replace("{out}", str(out))  # noqa: E731
    if case.setup == "run":
        shutil.copytree(fx / "run" / "debug", out / "debug", symlinks=True)
    args = [fill(a) for a in case.args]
    if case.cli == "train":
        args = [f"recipe={case.recipe}", *TINY, *args, f"paths.output_dir={out}"]
        if any(a.startswith("paths.output_dir=") for a in case.args):
            args.pop()
    protect = Path(fill(case.protect)) if case.protect else None
    before = snapshot(protect) if protect else {}
    t0 = time.time()
    try:
        proc = _cli(case.cli, args, out, case.timeout)
    except subprocess.TimeoutExpired as e:
        proc = subprocess.CompletedProcess(e.cmd, -9, str(e.stdout or ""), f"error: timed out after {case.timeout} s")
    after = snapshot(protect) if protect else {}
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    reasons = classify(case, proc, changed)
    if proc.returncode == -9:
        reasons.append("timeout")
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    return {"id": case.id, "cli": case.cli, "verdict": "BAD" if reasons else "GOOD", "why": reasons,
            "rc": proc.returncode, "seconds": round(time.time() - t0, 1),
            "last_line": lines[-1][:400] if lines else "", "args": args,
            "stderr_tail": proc.stderr[-1500:] if reasons else ""}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-k", action="append", default=[], help="run the cases whose id contains this")
    ap.add_argument("--fixtures", type=Path, default=Path(tempfile.gettempdir()) / "mt_cli_fuzz_fixtures")
    ap.add_argument("--json", type=Path, help="write every result here")
    ap.add_argument("--ids", type=Path, help="run only the cases whose ids this file lists (one a line)")
    ap.add_argument("--list", action="store_true")
    opts = ap.parse_args()
    cases = [c for c in train_cases() + other_cases() if not opts.k or any(k in c.id for k in opts.k)]
    if opts.ids:
        wanted = set(opts.ids.read_text().splitlines())
        cases = [c for c in cases if c.id in wanted]
    if opts.list:
        print("\n".join(c.id for c in cases))
        return 0
    if not (opts.fixtures / "trunc.ckpt").is_file():
        shutil.rmtree(opts.fixtures, ignore_errors=True)
        build_fixtures(opts.fixtures)
    root = Path(tempfile.mkdtemp(prefix="mt_cli_fuzz_"))
    results = []
    for case in cases:
        r = run_case(case, opts.fixtures, root)
        results.append(r)
        print(f"{r['verdict']:4} {r['seconds']:5.1f}s {case.id:55} {'; '.join(r['why'])[:150]}", flush=True)
        if r["verdict"] == "BAD":
            print(f"      last line: {r['last_line'][:300]}", flush=True)
    bad = [r for r in results if r["verdict"] == "BAD"]
    print(f"{len(results) - len(bad)} GOOD, {len(bad)} BAD of {len(results)} cases")
    if opts.json:
        opts.json.write_text(json.dumps(results, indent=1))
    shutil.rmtree(root, ignore_errors=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
