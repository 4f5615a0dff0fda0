import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# A model small enough that a training step takes well under a second on 2 CPU cores.
TINY = ["model.d_model=64", "model.n_layer=2", "data.seq_len=64", "data.micro_batch_size=4",
        "train.global_batch_tokens=256", "data.num_workers=0", "trainer.log_every_n_steps=1",
        "callbacks.progress_bar=null", "trainer.enable_model_summary=false"]


def metric_by_step(run_dir, key):
    """{step: value} of one metric from a run's CSV log."""
    import csv

    with open(Path(run_dir) / "metrics" / "metrics.csv") as f:
        return {int(r["step"]): float(r[key]) for r in csv.DictReader(f) if r.get(key)}


def helper_json(script: str, *args: str, timeout: int = 300) -> dict:
    """Run tests/helpers/<script> in a process of its own (e.g. under Triton's interpreter,
    which must be chosen before triton is imported) and parse the JSON of its last line."""
    import json
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, str(Path(__file__).parent / "helpers" / script), *args],
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])



def fuzz_stdout(script: str, *args: str, timeout: int = 600) -> str:
    """Run benchmarks/<script> (a randomised checker) and return its output; fails on any FAIL
    line or a nonzero exit, showing those lines."""
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "benchmarks" / script),
                           *args], capture_output=True, text=True, timeout=timeout)
    failures = [line for line in proc.stdout.splitlines()
                if " FAIL" in line and not line.lower().startswith("summary")]
    assert proc.returncode == 0 and not failures, "\n".join(failures) or proc.stderr[-3000:]
    return proc.stdout

def compose_config(overrides, output_dir):
    with initialize_config_module(config_module="mamba_train.conf", version_base="1.3"):
        return compose("config", overrides=[*overrides, f"paths.output_dir={output_dir}"])


@pytest.fixture
def make_config(tmp_path):
    def _make(*overrides, tiny=True):
        return compose_config([*(TINY if tiny else []), *overrides], tmp_path / "outputs")
    return _make


def pytest_collection_modifyitems(config, items):
    """``@pytest.mark.slow`` tests run only when asked for (``-m slow``, or any ``-m`` expression)."""
    if config.getoption("markexpr"):
        return
    skip = pytest.mark.skip(reason="slow: run with -m slow (or -m 'slow or not slow' for everything)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
