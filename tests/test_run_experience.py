"""What a user sees: progress lines without a terminal, one line per message, no third-party
noise, one run directory, and every console script answering --help."""

from __future__ import annotations

import importlib
import json
import logging
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# shrunk debug recipe: 4 optimizer steps, a line every step, a validation (with samples) at 2 and 4
SMALL = ["recipe=debug", "model.d_model=64", "model.n_layer=2", "data.seq_len=64",
         "data.micro_batch_size=4", "train.global_batch_tokens=256", "data.num_workers=0",
         "trainer.max_steps=4", "trainer.log_every_n_steps=1", "train.val_every_n_steps=2",
         "trainer.limit_val_batches=1", "callbacks.samples.new_tokens=4", "logger=csv"]
NOISE = ["LeafSpec", "litlogger", "litmodels", "limit_val_batches", "does not have many workers",
         "FLOPs not found", "Total FLOPs", "font cache", "wandb is not installed", "srun",
         "Epoch ", "__main__"]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}


def _scripts() -> dict[str, str]:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def test_every_entry_point_is_a_console_script():
    assert set(_scripts()) == {"mamba-train", "mamba-train-prepare", "mamba-train-eval",
                               "mamba-train-export", "mamba-train-lm-eval"}


@pytest.mark.parametrize("name", ["mamba-train-prepare", "mamba-train-eval", "mamba-train-export",
                                  "mamba-train-lm-eval"])
def test_key_value_entry_points_answer_help(name, capsys):
    if name == "mamba-train-lm-eval":
        pytest.importorskip("lm_eval")
    module, func = _scripts()[name].split(":")
    main = getattr(importlib.import_module(module), func)
    try:
        rc = main(["--help"])
    except SystemExit as e:  # lm-eval's argparse exits itself
        rc = e.code
    assert rc in (0, None)
    out = capsys.readouterr().out
    assert "usage" in out.lower()
    expected = {"mamba-train-prepare": "source=", "mamba-train-eval": "ckpt=",
                "mamba-train-export": "format=", "mamba-train-lm-eval": "--model"}[name]
    assert expected in out


def test_train_help_names_the_program_recipes_and_groups():
    proc = subprocess.run([sys.executable, "-m", "mamba_train", "--help"], capture_output=True,
                          text=True, env=_env(), cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("mamba-train:")
    assert "is powered by Hydra" not in proc.stdout
    recipes = re.search(r"^recipe: (.*)$", proc.stdout, re.M)
    assert recipes and "debug" in recipes.group(1).split(", ") and "mamba2-130m" in recipes.group(1)
    for group in ("model:", "data:", "logger:", "strategy:"):
        assert f"\n{group} " in proc.stdout


def test_csv_is_flushed_every_log_interval_and_in_every_logger_choice(make_config):
    for choice in ("csv", "wandb", "tensorboard"):
        cfg = make_config(f"logger={choice}", "trainer.log_every_n_steps=7")
        assert cfg.logger.csv.flush_logs_every_n_steps == 7, choice


def test_conflicting_run_dirs_are_one_error_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mamba_train", *SMALL, f"run_dir={tmp_path}/a",
                           f"hydra.run.dir={tmp_path}/b"], capture_output=True, text=True,
                          env=_env(), cwd=tmp_path, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "run_dir=" in proc.stderr and "hydra.run.dir=" in proc.stderr
    assert not (tmp_path / "a" / "checkpoints").exists()


@pytest.mark.slow
def test_redirected_run_prints_progress_lines_once_in_one_directory(tmp_path):
    """The debug recipe (shrunk) with stdout to a file and hydra.run.dir set: periodic step
    lines before the end, each message once, no noise, and everything in hydra.run.dir."""
    run_dir = tmp_path / "chosen"
    stdout = tmp_path / "stdout.txt"
    with open(stdout, "w") as f:
        proc = subprocess.run([sys.executable, "-m", "mamba_train", *SMALL,
                               f"paths.output_dir={tmp_path / 'elsewhere'}", f"hydra.run.dir={run_dir}"],
                              stdout=f, stderr=subprocess.STDOUT, env=_env(), cwd=tmp_path, timeout=600)
    text = stdout.read_text()
    assert proc.returncode == 0, text[-3000:]
    lines = text.splitlines()
    step_lines = [i for i, line in enumerate(lines) if re.search(r"\] step \d+/4 \| loss [\d.]+ \|", line)]
    assert len(step_lines) == 4, text
    end = next(i for i, line in enumerate(lines) if "run summary" in line)
    assert all(i < end for i in step_lines)
    assert all("tok/s" in lines[i] and "ETA" in lines[i] and "elapsed" in lines[i] for i in step_lines)
    assert sum(bool(re.search(r"\] val  step [24]/4 \| loss", line)) for line in lines) == 2
    assert sum("samples at step" in line for line in lines) == 2
    # one line per message: compare messages without the time stamp (continuation lines excluded)
    messages = [re.sub(r"^\[[^\]]*\]\[[A-Z]+\] ", "", line) for line in lines
                if line.strip() and not line.startswith(" ")]
    duplicated = {m for m in messages if messages.count(m) > 1}
    assert not duplicated, duplicated
    for noise in NOISE:
        assert noise not in text, noise
    assert "model summary:" in text and "backend: reference" in text and "training step: eager" in text

    # one run directory
    assert not (tmp_path / "elsewhere").exists()
    for rel in ("checkpoints/last.ckpt", "metrics/metrics.csv", ".hydra/config.yaml",
                "mamba-train.log", "summary.json"):
        assert (run_dir / rel).exists(), rel
    log_text = (run_dir / "mamba-train.log").read_text()
    assert len(re.findall(r"\] - step \d+/4 \| loss", log_text)) == 4
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["time_to_first_step_s"] > 0 and summary["steps"] == 4


def test_third_party_noise_is_filtered_and_lightning_prints_once(capsys, monkeypatch):
    import lightning  # noqa: F401  (adds its console handler)
    from mamba_train.cli.console import quiet_third_party

    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stdout)
    root.addHandler(handler)
    try:
        quiet_third_party()
        assert not [h for h in logging.getLogger("lightning").handlers if type(h) is logging.StreamHandler]
        rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
        rank_zero.warning("💡 Tip: For seamless cloud logging, try installing litlogger")
        rank_zero.warning("GPU available: False, used: False")
        rank_zero.info("TPU available: False, using: 0 TPU cores")
        task_log = logging.getLogger("lm_eval.api.task")  # lm-eval's own setup may have muted it
        for name in ("lm_eval", "lm_eval.api.task"):
            monkeypatch.setattr(logging.getLogger(name), "disabled", False)
            monkeypatch.setattr(logging.getLogger(name), "propagate", True)
            monkeypatch.setattr(logging.getLogger(name), "level", logging.NOTSET)
        task_log.warning("local_ppl: Custom kwargs can be passed to `--metadata` in console (as json string)")
        task_log.warning("local_ppl: kept, another lm-eval line")
        logging.getLogger("mamba_train.x").warning("💡 Tip: kept: not a Lightning record")
        out = capsys.readouterr().out
        assert "litlogger" not in out and "TPU available" not in out and "Custom kwargs" not in out
        assert "another lm-eval line" in out
        assert out.count("GPU available: False") == 1 and "kept" in out
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")
            quiet_third_party()  # re-installs the filters over simplefilter
            warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning)
            warnings.warn("Checkpoint directory /x/checkpoints exists and is not empty.", UserWarning)
            warnings.warn("something else", UserWarning)
        assert [str(w.message) for w in caught] == ["something else"]
    finally:
        root.removeHandler(handler)


def test_triton_caches_default_to_a_stable_user_dir(monkeypatch, tmp_path):
    from mamba_train.cli.console import default_kernel_caches

    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    monkeypatch.delenv("TRITON_CACHE_AUTOTUNING", raising=False)
    monkeypatch.setenv("MAMBA_TRAIN_CACHE", str(tmp_path))
    assert default_kernel_caches() == {"TRITON_CACHE_DIR": str(tmp_path / "triton"),
                                       "TRITON_CACHE_AUTOTUNING": "1"}
    assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "triton")
    monkeypatch.setenv("TRITON_CACHE_DIR", "/somewhere")
    monkeypatch.setenv("TRITON_CACHE_AUTOTUNING", "0")
    assert default_kernel_caches() == {}
    assert os.environ["TRITON_CACHE_DIR"] == "/somewhere"


def test_batched_greedy_samples_match_one_prompt_at_a_time():
    import torch

    from mamba_train.models.build import build_model
    from mamba_train.models.config import MambaLMConfig
    from mamba_train.training.run.callbacks.samples import greedy_continue

    torch.manual_seed(0)
    model = build_model(MambaLMConfig(d_model=32, n_layer=2, vocab_size=64), backend="reference").eval()
    prompts = [[5, 6, 7, 8, 9], [10, 11]]
    with torch.no_grad():
        batched = greedy_continue(model, prompts, 5, pad_id=0, device="cpu")
        alone = greedy_continue(model, prompts[:1], 5, pad_id=0, device="cpu")
    assert [len(t) for t in batched] == [5, 5]
    assert batched[0] == alone[0]  # the longest prompt has no padding: same tokens


class _FakeTrainer:
    """The few Trainer attributes StepProgress reads, stepping like a real fit."""

    def __init__(self, max_steps: int):
        import torch

        self.global_step, self.max_steps, self.world_size = 0, max_steps, 1
        self.is_global_zero, self.sanity_checking = True, False
        self.callbacks = []
        self.optimizers = [torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)]
        self.callback_metrics = {}

    clock = [0.0]  # fake perf_counter: one second per optimizer step

    def step(self, bar, loss: float):
        """One optimizer step: the training step's step-ended signal, then the batch-end hook."""
        from types import SimpleNamespace

        import torch

        from mamba_train.training.step.train_step import StepResult

        self.clock[0] += 1.0
        self.global_step += 1
        ended = StepResult(self.global_step, torch.tensor(loss), None,
                           self.optimizers[0].param_groups[0]["lr"], 1, 1, 1)
        module = SimpleNamespace(train_step=SimpleNamespace(ended=ended))
        bar.on_train_batch_end(self, module, None, None, self.global_step - 1)


def _drive(mode: str, steps: int = 6, every: int = 2):
    import torch

    from mamba_train.training.run.callbacks.progress import StepProgress

    _FakeTrainer.clock[0] = 0.0
    bar = StepProgress(mode=mode, every_n_steps=every, tokens_per_step=1000)
    trainer = _FakeTrainer(steps)
    bar.setup(trainer, None, "fit")
    bar.on_train_start(trainer, None)
    for i in range(steps):
        trainer.step(bar, 5.0 - i / 10)
        if trainer.global_step == 4:
            bar.on_validation_start(trainer, None)
            trainer.callback_metrics["val/loss"] = torch.tensor(4.25)
            bar.on_validation_end(trainer, None)
    bar.on_train_end(trainer, None)
    return bar


def test_progress_lines_count_optimizer_steps_of_the_run(caplog, monkeypatch):
    import types

    import mamba_train.training.run.callbacks.progress as progress

    monkeypatch.setattr(progress, "time", types.SimpleNamespace(perf_counter=lambda: _FakeTrainer.clock[0]))
    caplog.set_level(logging.INFO, logger="mamba_train.progress")
    _drive("lines")
    lines = [r.getMessage() for r in caplog.records]
    steps = [m for m in lines if m.startswith("step ")]
    assert [m.split(" | ")[0] for m in steps] == ["step 2/6", "step 4/6", "step 6/6"]
    assert "loss 4.9000" in steps[0] and "lr 0.5" in steps[0] and "| 1,000 tok/s |" in steps[0]
    # 1 s per step, measured from the end of the first step (its warm-up is not extrapolated)
    assert [m.split(" | ")[-1] for m in steps] == ["ETA 0:00:04", "ETA 0:00:02", "ETA 0:00:00"]
    assert "elapsed 0:00:06" in steps[-1]
    assert [m for m in lines if m.startswith("val ")] == [
        next(m for m in lines if m.startswith("val  step 4/6 | loss 4.2500 |"))]


def test_progress_bar_counts_steps_and_shows_val_loss():
    import torch

    from mamba_train.training.run.callbacks.progress import StepProgress

    bar = StepProgress(mode="bar", every_n_steps=2, tokens_per_step=1000)
    trainer = _FakeTrainer(6)
    bar.setup(trainer, None, "fit")
    bar.on_train_start(trainer, None)
    progress, task = bar._bar, bar._bar.tasks[0]
    assert (task.total, task.completed) == (6, 0)  # optimizer steps of the run, not an epoch
    for i in range(4):
        trainer.step(bar, 5.0 - i / 10)
    assert task.completed == 4 and "loss 4.700" in task.fields["info"] and "tok/s" in task.fields["info"]
    trainer.callback_metrics["val/loss"] = torch.tensor(4.25)
    bar.on_validation_start(trainer, None)
    assert task.description == "validating"
    bar.on_validation_end(trainer, None)
    assert "val 4.250" in task.fields["info"] and task.description == "train"
    bar.on_train_end(trainer, None)
    assert bar._bar is None and progress.finished is False and task.completed == 4


def test_progress_bar_eta_is_the_runs_and_the_log_file_gets_the_lines(monkeypatch, tmp_path):
    """Steps far apart (Rich's 30 s speed window sees one): the bar's ETA is still the run's
    mean step time; the bar's steps and validations are lines in the run's log file."""
    import types

    import mamba_train.training.run.callbacks.progress as progress

    monkeypatch.setattr(progress, "time", types.SimpleNamespace(
        perf_counter=lambda: 60 * _FakeTrainer.clock[0]))  # a minute per step
    handler = logging.FileHandler(tmp_path / "run.log")
    logging.getLogger().addHandler(handler)
    try:
        _FakeTrainer.clock[0] = 0.0
        bar = progress.StepProgress(mode="bar", every_n_steps=2, tokens_per_step=1000)
        trainer = _FakeTrainer(6)
        bar.setup(trainer, None, "fit")
        bar.on_train_start(trainer, None)
        task = bar._bar.tasks[0]
        assert task.fields["eta"] == "-"
        for i in range(4):
            trainer.step(bar, 5.0 - i / 10)
        assert task.fields["eta"] == "0:02:00"  # 2 steps left at 60 s each
        bar.on_validation_start(trainer, None)
        bar.on_validation_end(trainer, None)
        bar.on_train_end(trainer, None)
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    text = (tmp_path / "run.log").read_text()
    assert "step 2/6 | loss" in text and "step 4/6 | loss" in text and "ETA 0:02:00" in text
    assert "val  step 4/6" in text


def test_no_progress_callback_means_no_lightning_epoch_bar(make_config, capsys):
    from mamba_train.train import train

    cfg = make_config("recipe=debug", "trainer.max_steps=1", "train.val_every_n_steps=1000",
                      "trainer.limit_val_batches=0", "logger=csv", "callbacks.samples=null")
    assert cfg.callbacks.progress_bar is None  # TINY disables it
    result = train(cfg)
    assert result["trainer"].progress_bar_callback is None
    assert "Epoch 0" not in capsys.readouterr().err
