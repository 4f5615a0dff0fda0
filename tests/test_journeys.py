"""A newcomer's journeys through the real CLI: resume a run by its name alone, sweep with -m."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from mamba_train.cli.resume_overrides import (ResumeConfigError, merge_overrides, restore_run_overrides,
                                          schedule_extension_note)

ROOT = Path(__file__).resolve().parents[1]
# a ~0.15M-parameter Mamba-1: a step takes milliseconds
TINY = ["recipe=debug", "model.d_model=32", "model.n_layer=1", "data.seq_len=32",
        "data.micro_batch_size=2", "train.global_batch_tokens=64", "data.num_workers=0",
        "trainer.limit_val_batches=1", "train.val_every_n_steps=1000", "logger=csv",
        "callbacks.samples=null"]


def _cli(*args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, "-m", "mamba_train", *args], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=timeout)


def test_saved_overrides_come_first_and_new_ones_replace_them_in_place():
    saved = ["recipe=debug", "model.d_model=32", "trainer.max_steps=3", "run_name=X"]
    new = ["run_name=X", "trainer.max_steps=9", "ckpt_path=last", "+logger.x=1"]
    assert merge_overrides(saved, new) == ["recipe=debug", "model.d_model=32", "trainer.max_steps=9",
                                           "run_name=X", "ckpt_path=last", "+logger.x=1"]
    # a key set several times (a wrapper's defaults, then the user's): its last value wins on
    # both sides, so a new value is never shadowed by a later saved one
    saved = ["data.micro_batch_size=2", "model.d_model=32", "data.micro_batch_size=1"]
    new = ["data.micro_batch_size=2", "data.micro_batch_size=1", "data.micro_batch_size=4"]
    assert merge_overrides(saved, new) == ["model.d_model=32", "data.micro_batch_size=4"]
    assert merge_overrides(saved, ["trainer.max_steps=9"]) == [*saved, "trainer.max_steps=9"]


def _fake_run(run_dir: Path, overrides: list[str], make_config) -> None:
    """What a finished CLI run leaves for the resume decision: .hydra/overrides.yaml and the
    resolved config (composed exactly as the CLI composes them)."""
    cfg = make_config(*overrides, tiny=False)
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (run_dir / "config.resolved.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))


def test_resume_restores_the_saved_overrides_and_refuses_unsafe_ones(tmp_path, make_config):
    run_dir = tmp_path / "outputs" / "X"
    first = [*TINY, "run_name=X", "optim.lr=1e-3", f"paths.output_dir={tmp_path / 'outputs'}"]
    _fake_run(run_dir, first, make_config)
    where = [f"paths.output_dir={tmp_path / 'outputs'}", "run_name=X"]

    argv, note = restore_run_overrides([*where, "ckpt_path=last", "trainer.max_steps=50"])
    assert argv[:len(first)] == first
    assert "optim.lr=1e-3" in argv and "trainer.max_steps=50" in argv and "ckpt_path=last" in argv
    assert "trainer.max_steps=50" in note
    # resume=<run dir> is the same resume
    argv2, _ = restore_run_overrides([f"resume={run_dir}", "trainer.max_steps=50"])
    assert "optim.lr=1e-3" in argv2 and f"run_dir={run_dir.resolve()}" in argv2
    with pytest.raises(ResumeConfigError, match="resume=nope: .* holds no run"):
        restore_run_overrides([f"paths.output_dir={tmp_path / 'outputs'}", "resume=nope"])
    # no ckpt_path: nothing restored (a fresh run; train() refuses the existing checkpoints)
    assert restore_run_overrides([*where, "trainer.max_steps=50"]) == ([*where, "trainer.max_steps=50"], None)

    with pytest.raises(ResumeConfigError) as e:
        restore_run_overrides([*where, "ckpt_path=last", "model.d_model=64", "optim.lr=2e-3",
                               "trainer.log_every_n_steps=7"])
    message = str(e.value)
    assert "model.d_model: 32 -> 64" in message and "optim.lr: 0.001 -> 0.002" in message
    assert "log_every_n_steps" not in message and "\n" not in message


def test_a_run_from_before_a_module_move_resumes(make_config):
    """A ``_target_`` names where the code lives: the same object at a new path is no change,
    another object is."""
    from omegaconf import OmegaConf

    from mamba_train.cli.resume_overrides import changed_keys

    cfg = make_config()
    saved = OmegaConf.to_container(cfg, resolve=True)
    saved["module"]["_target_"] = "mamba_train.training.module.MambaLMModule"  # an older layout
    assert changed_keys(saved, cfg) == []
    saved["module"]["_target_"] = "mamba_train.training.module.OtherModule"
    assert [k for k, _, _ in changed_keys(saved, cfg)] == ["module._target_"]


def test_refused_resume_is_one_line_and_leaves_the_run_untouched(tmp_path, make_config):
    run_dir = tmp_path / "outputs" / "X"
    _fake_run(run_dir, [*TINY, "run_name=X", f"paths.output_dir={tmp_path / 'outputs'}"], make_config)
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in run_dir.rglob("*") if p.is_file()}
    proc = _cli(f"paths.output_dir={tmp_path / 'outputs'}", "run_name=X", "ckpt_path=last",
                "data.seq_len=64", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "data.seq_len: 32 -> 64" in proc.stderr
    after = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in run_dir.rglob("*") if p.is_file()}
    assert after == before


@pytest.mark.slow
def test_resume_by_name_after_a_run_with_overrides(tmp_path):
    out = tmp_path / "outputs"
    first = _cli(*TINY, "run_name=X", "optim.lr=2e-3", "trainer.max_steps=3", f"paths.output_dir={out}",
                 cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    run_dir = out / "X"
    resumed = _cli("run_name=X", f"paths.output_dir={out}", "ckpt_path=last", "trainer.max_steps=5",
                   "trainer.log_every_n_steps=1", cwd=tmp_path)
    text = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, text[-3000:]
    assert "resuming from" in text and "(step 3)" in text
    # the LR past the restored 3-step schedule is said before training
    assert "runs past the LR schedule" in text and "from step 3 to 4" in text
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 5
    resolved = yaml.safe_load((run_dir / "config.resolved.yaml").read_text())
    assert resolved["model"]["d_model"] == 32 and resolved["optim"]["lr"] == 2e-3
    saved = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text())
    assert "optim.lr=2e-3" in saved and "trainer.max_steps=5" in saved
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 5


@pytest.mark.slow
def test_two_job_sweep_gives_each_job_its_own_run_directory(tmp_path):
    out = tmp_path / "outputs"
    proc = _cli("-m", *TINY, "trainer.max_steps=2", f"paths.output_dir={out}", "optim.lr=1e-3,3e-3",
                cwd=tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    lrs = set()
    for job in ("0", "1"):
        run_dir = out / "multirun" / "debug" / job
        assert (run_dir / "checkpoints" / "last.ckpt").is_file()
        assert (run_dir / ".hydra" / "overrides.yaml").is_file()
        lrs.add(yaml.safe_load((run_dir / "config.resolved.yaml").read_text())["optim"]["lr"])
    assert lrs == {1e-3, 3e-3}


def _checkpoint_with_schedule(run_dir: Path, schedule, total: int, at_step: int) -> None:
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched = schedule(opt, total_steps=total)
    for _ in range(at_step):
        opt.step()
        sched.step()
    (run_dir / "checkpoints").mkdir(parents=True)
    torch.save({"state_dict": {}, "global_step": at_step, "lr_schedulers": [sched.state_dict()]},
               run_dir / "checkpoints" / "last.ckpt")


def test_extending_a_finished_schedule_says_the_lr(tmp_path):
    from mamba_train.training.step.schedule import warmup_cosine, wsd

    _checkpoint_with_schedule(tmp_path / "a", warmup_cosine, total=10, at_step=10)
    note = schedule_extension_note(tmp_path / "a", 20)
    assert "warmup_cosine over 10 steps" in note and "lr 1e-05 from step 10 to 19" in note
    assert "scheduler=wsd" in note
    assert schedule_extension_note(tmp_path / "a", 10) is None
    # mid-run, in the stable phase of a wsd schedule: the decay still ends at the old length
    _checkpoint_with_schedule(tmp_path / "b", wsd, total=10, at_step=4)
    note = schedule_extension_note(tmp_path / "b", 30)
    assert "wsd over 10 steps" in note and "lr 0.001 at step 4" in note and "lr 0 from step 10 to 29" in note
    assert schedule_extension_note(tmp_path / "empty", 100) is None


# ----------------------------------------------------------------------------- own data
WORDS = "the of and to in is was for on that with as by at from his her an which or this be".split()


def _corpus(path: Path, n_docs: int = 100) -> list[str]:
    import random

    rng = random.Random(0)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 120))) for _ in range(n_docs)]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    return docs


def _own_tokenizer(directory: Path, docs: list[str]) -> Path:
    """A 300-token byte-level BPE with the usual EOS, saved as tokenizer.json."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(docs, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    directory.mkdir(parents=True)
    tok.save(str(directory / "tokenizer.json"))
    return directory / "tokenizer.json"


@pytest.fixture(scope="module")
def own_data(tmp_path_factory):
    """100 documents prepared with their own tokenizer (default prepare settings)."""
    from mamba_train.cli.prepare import main as prepare_main

    d = tmp_path_factory.mktemp("own")
    docs = _corpus(d / "docs.jsonl")
    tok = _own_tokenizer(d / "tok", docs)
    assert prepare_main([f"source={d / 'docs.jsonl'}", f"out={d / 'data'}", f"tokenizer={tok}",
                         "num_proc=1"]) == 0
    return d / "data", tok


def test_a_small_corpus_still_gets_a_val_window(own_data):
    data, _ = own_data
    val = json.loads((data / "val" / "index.json").read_text())
    train = json.loads((data / "train" / "index.json").read_text())
    assert val["total_tokens"] >= 2049 and train["total_tokens"] > val["total_tokens"]


def test_tokenizer_and_vocabulary_come_from_the_data(own_data, make_config):
    from mamba_train.from_data import DataTokenizerMismatch, adopt_data_tokenizer

    data, tok = own_data
    cfg = make_config(f"data.path={data}")
    note = adopt_data_tokenizer(cfg)
    assert cfg.model.vocab_size == 300 and cfg.data.tokenizer == str(tok.resolve())
    assert "model.vocab_size=300" in note
    assert adopt_data_tokenizer(cfg) is None  # already agrees
    cfg = make_config(f"data.path={data}", "model.vocab_size=4096")
    with pytest.raises(DataTokenizerMismatch) as e:
        adopt_data_tokenizer(cfg, explicit={"model.vocab_size"})
    assert "model.vocab_size=300" in str(e.value) and f"data.tokenizer={tok.resolve()}" in str(e.value)


def test_prepare_without_a_terminal_prints_whole_dated_lines(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mamba_train.data.prepare", "source=default",
                           f"out={tmp_path / 'o'}", "num_proc=1"], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    line = next(x for x in proc.stderr.splitlines() if "tokenizing" in x)
    assert line.startswith("[20") and " docs | " in line and "tokens/s" in line and "elapsed" in line
    assert any(len(x) > 80 for x in proc.stderr.splitlines())  # not cut to the console width


@pytest.mark.slow
def test_training_on_own_small_corpus_needs_no_extra_keys(own_data, tmp_path):
    """100 documents, their own tokenizer, default prepare: trains and validates with no
    tokenizer or vocabulary key; prepared without a val split, it trains with validation off."""
    from mamba_train.cli.prepare import main as prepare_main

    data, tok = own_data
    common = ["recipe=debug", "model.d_model=32", "model.n_layer=1", "data.num_workers=0",
              "logger=csv", "trainer.max_steps=2", "train.val_every_n_steps=2",
              "callbacks.samples=null", f"paths.output_dir={tmp_path}"]
    proc = _cli(*common, f"data.path={data}", cwd=tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "model.vocab_size=300" in proc.stdout and "val  step 2/2" in proc.stdout

    no_val = tmp_path / "no_val"
    assert prepare_main([f"source={data.parent / 'docs.jsonl'}", f"out={no_val}", f"tokenizer={tok}",
                         "num_proc=1", "val_fraction=0"]) == 0
    refused = _cli(*common, f"data.path={no_val}", "run_name=b", cwd=tmp_path)
    assert refused.returncode == 2 and "trainer.limit_val_batches=0" in refused.stderr
    off = _cli(*common, f"data.path={no_val}", "run_name=c", "trainer.limit_val_batches=0", cwd=tmp_path)
    assert off.returncode == 0, (off.stdout + off.stderr)[-3000:]
    assert "val  step" not in off.stdout


def test_batch_error_offers_the_micro_batch_that_keeps_the_global_batch():
    import re

    from mamba_train.training.step.batch import BatchSizeError, grad_accumulation

    with pytest.raises(BatchSizeError) as e:
        grad_accumulation(524288, 3, 2048, 2)  # 2 GPUs, micro-batch 3
    m = int(re.search(r"data\.micro_batch_size=(\d+) keeps", str(e.value)).group(1))
    assert m < 3 and grad_accumulation(524288, m, 2048, 2) * m * 2048 * 2 == 524288
    with pytest.raises(BatchSizeError) as e:  # no micro-batch divides it: the global batch must change
        grad_accumulation(524288, 8, 2048, 3)
    assert "keeps" not in str(e.value) and "train.global_batch_tokens to a multiple" in str(e.value)


def test_a_save_model_directory_is_one_line_asking_for_tokenizer_json(tmp_path, capsys):
    from tokenizers import Tokenizer, models

    from mamba_train.cli.prepare import main as prepare_main

    Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "ab": 2}, merges=[("a", "b")])).model.save(str(tmp_path))
    (tmp_path / "docs.jsonl").write_text('{"text": "ab"}\n')
    rc = prepare_main([f"source={tmp_path / 'docs.jsonl'}", f"out={tmp_path / 'o'}", f"tokenizer={tmp_path}"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0
    assert "tokenizer.json" in err and "vocab.json" in err


def test_tensorboard_without_the_package_is_one_warning(monkeypatch, caplog, make_config, tmp_path):
    import importlib.util

    from hydra.utils import instantiate
    from lightning.pytorch.loggers import TensorBoardLogger
    from lightning.pytorch.loggers.logger import DummyLogger

    cfg = make_config("logger=tensorboard")
    assert isinstance(instantiate(cfg.logger.tensorboard), TensorBoardLogger)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("tensorboard", "tensorboardX") else real(name, *a))
    with caplog.at_level("WARNING"):
        assert isinstance(instantiate(cfg.logger.tensorboard), DummyLogger)
    assert [r.getMessage() for r in caplog.records if "mamba_train[tensorboard]" in r.getMessage()]


def test_training_and_jsonl_prepare_need_neither_datasets_nor_matplotlib(tmp_path):
    """The base install: with datasets, matplotlib, pandas and pyarrow absent, the training
    modules import, the run summary skips its plot with a hint, and prepare reads .jsonl."""
    (tmp_path / "d.jsonl").write_text('{"text": "hello world"}\n' * 3)
    code = f"""
import logging, sys
logging.basicConfig(level=logging.INFO)
for name in ("datasets", "pandas", "pyarrow"):  # as if not installed
    sys.modules[name] = None
import mamba_train.train
from mamba_train.training.run.callbacks.run_summary import plot_metrics
# torchmetrics (under Lightning) imports matplotlib when its distribution is installed: absent
# from here on, as on a base install
for name in [m for m in sys.modules if m.split(".")[0] == "matplotlib"] + ["matplotlib"]:
    sys.modules[name] = None
from mamba_train.cli.prepare import main
assert plot_metrics({{"train/loss": [(1, 2.0)]}}, {str(tmp_path / 'p.png')!r}) is None
assert main(["source={tmp_path / 'd.jsonl'}", "out={tmp_path / 'o'}", "num_proc=1"]) == 0
assert main(["source={tmp_path / 'x.parquet'}", "out={tmp_path / 'o2'}"]) == 2
"""
    (tmp_path / "x.parquet").write_bytes(b"")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "mamba_train[datasets]" in proc.stderr and "mamba_train[plot]" in proc.stdout + proc.stderr


@pytest.mark.parametrize("override, expected", [
    ("trainer.log_every_n_steps=0", "trainer.log_every_n_steps=0 must be a positive integer"),
    ("trainer.devices=0", "trainer.devices=0 must be auto, -1 (all)"),
    ("strategy=megatron", "Could not find 'strategy/megatron'"),
    ("optim.lrr=1", "optim.lrr is not a key of the config. Did you mean optim.lr?"),
])
def test_a_bad_value_on_resume_leaves_every_file_of_the_run_as_it_was(tmp_path, make_config,
                                                                       override, expected):
    """Keys a resume may change (cadences, devices, strategy) passed the resume check and failed
    inside the job, after Hydra had rewritten .hydra/ and appended to the log; an unknown key was
    Hydra's multi-line report. Now both are one line before anything is written."""
    run_dir = tmp_path / "outputs" / "X"
    _fake_run(run_dir, [*TINY, "run_name=X", f"paths.output_dir={tmp_path / 'outputs'}"], make_config)
    (run_dir / "mamba-train.log").write_text("the first run's log\n")
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in run_dir.rglob("*") if p.is_file()}
    proc = _cli(f"paths.output_dir={tmp_path / 'outputs'}", "run_name=X", "ckpt_path=last", override,
                cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().count("\n") == 0 and expected in proc.stderr, proc.stderr
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in run_dir.rglob("*") if p.is_file()} == before
