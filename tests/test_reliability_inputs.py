"""The run directory is the run's own, and the data a run reads is what it claims to be: planted
symbolic links, a foreign directory, a data mixture killed and resumed, another batching on
resume, token ids outside the vocabulary. Every run is the real CLI (tests/helpers/fault_cli.py).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from helpers import faults

sys.path.insert(0, str(Path(__file__).parent))
from test_reliability_cli import _ok, _one_error_line  # noqa: E402

SHORT = ["trainer.max_steps=4", "train.checkpoint_every_n_steps=2"]


def test_symbolic_links_planted_in_the_run_directory_are_never_written_through(tmp_path):
    """The CLI: Hydra opened the log through the planted link; the run closes it unwritten and
    refuses in one line (every other file is refused the same way, below, through the API)."""
    run_dir, outside = tmp_path / "debug", tmp_path / "outside"
    run_dir.mkdir()
    outside.mkdir()
    (run_dir / ".lock").write_text("")  # a run started here before
    for name in ("mamba-train.log", "summary.json"):
        (outside / name).write_text("keep me\n")
        (run_dir / name).symlink_to(outside / name)
    proc = faults.run(tmp_path, *SHORT)
    _one_error_line(proc, f"{run_dir / 'mamba-train.log'} is a symbolic link (to "
                    f"{outside / 'mamba-train.log'})", "remove the link")
    assert [(outside / n).read_text() for n in ("mamba-train.log", "summary.json")] == ["keep me\n"] * 2
    assert not (run_dir / "checkpoints").exists()


@pytest.mark.parametrize("name", [".lock", "summary.json", "loss.png", "wandb_run_id",
                                  "metrics/metrics.csv"])
def test_every_file_a_run_writes_refuses_a_planted_link(tmp_path, name):
    from mamba_train.fileio import UnsafePathError
    from mamba_train.training.run.run_lock import lock_run_dir, unlock_run_dir

    run_dir, target = tmp_path / "run", tmp_path / "target"
    (run_dir / "metrics").mkdir(parents=True)
    (run_dir / "config.resolved.yaml").write_text("")  # a run directory
    target.write_text("keep me\n")
    (run_dir / name).symlink_to(target)
    with pytest.raises(UnsafePathError, match=f"{name} is a symbolic link"):
        lock_run_dir(run_dir)
    unlock_run_dir(run_dir)
    assert target.read_text() == "keep me\n"


def test_a_fresh_run_refuses_a_directory_that_is_not_a_run_directory(tmp_path):
    """prepare refuses a foreign out=; a run refuses a foreign run_dir the same way instead of
    pruning its metrics/metrics.csv and replacing its summary.json and loss.png."""
    mine = tmp_path / "analysis"
    (mine / "metrics").mkdir(parents=True)
    rows = "step,train/loss\n0,1.5\n7,1.2\n"
    (mine / "metrics" / "metrics.csv").write_text(rows)
    (mine / "summary.json").write_text('{"mine": true}\n')
    proc = faults.run(tmp_path, *SHORT, f"run_dir={mine}", "ckpt_path=last")
    _one_error_line(proc, f"run_dir={mine.resolve()} already exists and is not a mamba_train "
                    "run directory (it holds metrics, summary.json)", "choose another run_dir")
    assert (mine / "metrics" / "metrics.csv").read_text() == rows
    assert (mine / "summary.json").read_text() == '{"mine": true}\n'
    assert not (mine / "checkpoints").exists() and not (mine / ".lock").exists()


def _default_data() -> Path:
    from mamba_train.data.datamodule import ensure_default_data

    return ensure_default_data()


@pytest.mark.slow  # two CLI runs, one killed
def test_a_killed_data_mixture_run_resumes(tmp_path):
    """data.sources=[...] (so every mixture recipe) keeps its sources in the checkpoint as plain
    lists: kill -9 after a checkpoint, then ckpt_path=last resumes it, one row per step."""
    root = _default_data()
    mix = f'data.sources=[{{path:"{root}",weight:3}},{{path:"{root}",weight:1}}]'
    run_dir = tmp_path / "debug"
    proc = faults.start(tmp_path, mix, "trainer.max_steps=8", "train.checkpoint_every_n_steps=2",
                        faults={"step_sleep": 0.15})
    faults.wait_for_step(proc, run_dir, 4)
    faults.kill(proc, signal.SIGKILL)
    proc.wait()
    resumed = _ok(faults.run(tmp_path, mix, "trainer.max_steps=8", "train.checkpoint_every_n_steps=2",
                             "ckpt_path=last"))
    assert "resuming from" in resumed.stdout + resumed.stderr
    assert [s for s, _ in faults.losses(run_dir)] == list(range(1, 9))
    assert faults.global_step(run_dir / "checkpoints" / "last.ckpt") == 8
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["tokens_seen"] == 8 * 64  # counted from the samples handed out
    assert summary["time_to_first_step_s"] is not None and "not started" not in summary["training_step"]


@pytest.mark.slow  # three CLI runs
def test_another_batching_on_resume_is_refused_in_one_line(tmp_path):
    """A resume with another micro-batch size or global batch would put Lightning's accumulation
    windows off the step boundaries (a part-window first step, shifted later ones) and misreport
    tokens_seen: refused, naming the checkpoint's value and this run's. The key is given twice on
    the command line (a wrapper's default, then the user's), and the last value is the one
    compared."""
    run_dir = tmp_path / "debug"
    _ok(faults.run(tmp_path, "trainer.max_steps=3", "train.checkpoint_every_n_steps=3",
                   "data.micro_batch_size=1"))  # 64 tokens/step = 2 micro-batches of 1 x 32
    rows = faults.rows(run_dir)
    # the micro-batch may change on resume unless the accumulation then differs (the loader's
    # check); the global batch is part of what the checkpoint was trained as (the CLI's check)
    for change, expected in (("data.micro_batch_size=2", (
            "cannot resume with another batching", "data.micro_batch_size=1 x 2 accumulated",
            "this run has data.micro_batch_size=2 x 1")), ("train.global_batch_tokens=128", (
            "would change what its checkpoint was trained as", "train.global_batch_tokens: 64 -> 128"))):
        proc = faults.run(tmp_path, "trainer.max_steps=6", "data.micro_batch_size=1", change,
                          "ckpt_path=last")
        _one_error_line(proc, *expected)
        assert faults.rows(run_dir) == rows


def test_the_loader_refuses_another_batching_without_the_cli():
    """The Python API (``train(cfg)``) has no command-line check: the loader's own refusal."""
    from types import SimpleNamespace

    from mamba_train.data.loader import DataError, ResumableDataLoader

    state = {"world_size": 1, "micro_batch_size": 1, "accumulate_grad_batches": 2}
    loader = SimpleNamespace(batch_size=2, accumulate_grad_batches=1,
                             dataset=SimpleNamespace(world_size=1))
    with pytest.raises(DataError, match="data.micro_batch_size=1 x 2 accumulated"):
        ResumableDataLoader._check_batching(loader, state)
    loader.batch_size, loader.accumulate_grad_batches = 1, 2
    ResumableDataLoader._check_batching(loader, state)  # the same batching resumes


@pytest.mark.slow  # two CLI runs
def test_token_ids_outside_the_vocabulary_name_the_shard(tmp_path):
    """A flipped high byte in a shard: the window that reads it stops the run in one line naming
    the shard and position (an IndexError in the embedding otherwise; a device assert on GPU).
    An index that records such an id is refused before training starts."""
    import shutil

    from mamba_train.fileio import atomic_write_json

    data = tmp_path / "data"
    shutil.copytree(_default_data(), data)
    shard = data / "train" / "shard_00000.bin"
    tokens = np.fromfile(shard, dtype="<u2")
    tokens[: tokens.size] = np.where(np.arange(tokens.size) % 997 == 5, 0xF00D, tokens)
    tokens.tofile(shard)  # sha256 no longer matches, max_token_id still says it is fine
    proc = faults.run(tmp_path, *SHORT, f"data.path={data}", "data.num_workers=1")
    err = _one_error_line(proc, f"shard {shard} holds token id 61453 at position",
                          "outside the vocabulary of 4096 ids")
    assert "Caught" not in err and "IndexError" not in proc.stderr
    index = json.loads((data / "train" / "index.json").read_text())
    index["shards"][0]["max_token_id"] = 61453
    atomic_write_json(data / "train" / "index.json", index)
    _one_error_line(faults.run(tmp_path, *SHORT, f"data.path={data}", "run_name=b"),
                    f"shard {shard} holds token id 61453, outside the vocabulary of 4096 ids")


@pytest.mark.slow  # two CLI runs, signalled
def test_sigusr1_and_sighup_save_and_a_second_signal_says_it_did_not(tmp_path):
    """SIGUSR1 outside SLURM and SIGHUP (a closed terminal) killed the run unsaved: now they save
    at the next step and exit 128 + signal like SIGTERM. A second signal before the boundary
    stops at once: one line saying nothing was saved, status 1 (not a saved stop's 128 + n)."""
    run_dir = tmp_path / "debug"
    common = ["trainer.max_steps=30", "train.checkpoint_every_n_steps=100"]
    proc = faults.start(tmp_path, *common, faults={"step_sleep": 0.15})
    faults.wait_for_step(proc, run_dir, 2)
    faults.kill(proc, signal.SIGUSR1)
    done = faults.finish(proc)
    assert done.returncode == 128 + signal.SIGUSR1, done.stderr[-3000:]
    step = faults.global_step(run_dir / "checkpoints" / "last.ckpt")
    assert f"stopped by SIGUSR1 after step {step}" in done.stdout
    hold = tmp_path / "hold"
    hold.touch()  # the resumed run's steps wait: no step boundary between the two signals
    proc = faults.start(tmp_path, *common, "ckpt_path=last", faults={"hold_while": hold})
    log = run_dir / "mamba-train.log"
    faults.wait_for(lambda: f"training starts at step {step}" in log.read_text(), proc,
                    what="the resumed run's first step")
    faults.kill(proc, signal.SIGHUP)
    time.sleep(0.5)  # two signals sent at once would merge into one
    faults.kill(proc, signal.SIGHUP)
    done = faults.finish(proc)
    assert done.returncode == 1, done.stderr[-3000:]
    assert "error: second SIGHUP before the next step boundary: stopped at once, without saving" \
        in done.stderr
    assert faults.global_step(run_dir / "checkpoints" / "last.ckpt") == step  # nothing new saved


def test_a_model_that_cannot_fit_is_refused_before_anything_is_allocated(tmp_path):
    from mamba_train.models.config import MambaLMConfig
    from mamba_train.models.lm import MambaLM
    from mamba_train.training.run.callbacks.run_start import ModelTooLargeError, check_model_memory

    hybrid = MambaLMConfig(d_model=64, n_layer=5, vocab_size=4096, d_intermediate=128,
                           ssm_cfg={"layer": "Mamba2"}, attn_layer_idx=[1, 4],
                           attn_cfg={"num_heads": 4, "causal": True})
    built = sum(p.numel() for p in MambaLM(hybrid, backend="reference", device="meta").parameters())
    assert check_model_memory(hybrid) == built  # counted from one block of each kind
    with pytest.raises(ModelTooLargeError, match="model.n_layer=100000 make"):
        check_model_memory(MambaLMConfig(d_model=256, n_layer=100_000, vocab_size=4096),
                           available_bytes=64 * 2**30)
    proc = faults.run(tmp_path, "model.d_model=1000000", timeout=120)
    _one_error_line(proc, "model.d_model=1000000, model.n_layer=1 make", "check the model size")


@pytest.mark.slow  # two CLI runs
def test_ckpt_path_last_looks_where_model_checkpoint_writes(tmp_path):
    """callbacks.model_checkpoint.dirpath elsewhere: last resumes from there (not step 0 over it)."""
    elsewhere = tmp_path / "scratch" / "ckpts"
    common = [f"callbacks.model_checkpoint.dirpath={elsewhere}", "train.checkpoint_every_n_steps=2"]
    _ok(faults.run(tmp_path, "trainer.max_steps=4", *common))
    proc = _ok(faults.run(tmp_path, "trainer.max_steps=6", *common, "ckpt_path=last"))
    line = next(ln for ln in (proc.stdout + proc.stderr).splitlines() if "resuming from" in ln)
    assert f"resuming from {elsewhere}/" in line and line.endswith("(step 4)"), line
    assert [s for s, _ in faults.losses(tmp_path / "debug")] == list(range(1, 7))
    assert faults.global_step(elsewhere / "last.ckpt") == 6


def test_an_unset_environment_variable_is_one_line_naming_the_key(tmp_path):
    proc = faults.run(tmp_path, "data.tokenizer=${oc.env:MT_TEST_SURELY_UNSET}", timeout=120)
    _one_error_line(proc, "data.tokenizer: Environment variable 'MT_TEST_SURELY_UNSET' not found",
                    "override data.tokenizer=")


@pytest.mark.parametrize("override, expected", [
    ("run_name=" + "x" * 300, "the run directory's name 'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx'... is 300 characters"),
    ("run_name=${oc.env:MT_TEST_SURELY_UNSET}", "Environment variable 'MT_TEST_SURELY_UNSET' not found"),
    (".hydra", ".hydra is a file; Hydra keeps the run's config copies in that directory"),
])
def test_what_hydra_would_trip_over_is_one_line(tmp_path, override, expected):
    if override == ".hydra":
        (tmp_path / "debug").mkdir()
        (tmp_path / "debug" / ".hydra").write_text("")
        override = "trainer.max_steps=1"
    _one_error_line(faults.run(tmp_path, override, timeout=120), expected)


def test_a_model_key_that_cannot_build_on_resume_leaves_the_run_untouched(tmp_path):
    """A resume whose model config fails to build (here a kernel choice under model.*) is one line
    naming the right key, and the run's record (resolved config, checkpoints) stays as it was."""
    run_dir = tmp_path / "debug"
    _ok(faults.run(tmp_path, "trainer.max_steps=2", "train.checkpoint_every_n_steps=2"))
    before = {p: p.read_bytes() for p in [run_dir / "config.resolved.yaml",
                                          *(run_dir / "checkpoints").glob("*.ckpt")]}
    proc = faults.run(tmp_path, "trainer.max_steps=4", "ckpt_path=last",
                      "+model.ssm_cfg.ssd_kernel=mamba_train", timeout=120)
    _one_error_line(proc, "model.ssm_cfg.ssd_kernel is a kernel choice", "set kernels.ssd")
    after = {p: p.read_bytes() for p in [run_dir / "config.resolved.yaml",
                                         *(run_dir / "checkpoints").glob("*.ckpt")]}
    assert after == before
