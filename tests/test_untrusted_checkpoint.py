"""A ``.ckpt`` is data, never code: a checkpoint whose pickle calls ``os.system`` is refused in
one line naming the file by every entry that reads checkpoints (``load_model``, ``init_from``,
``mamba_train.eval``, ``mamba_train.export``, the lm-eval adapter and its CLI), and its payload
never runs. Genuine checkpoints -- also ones holding numpy RNG state -- still load."""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import compose_config
from mamba_train import MambaLMConfig, build_model, load_model
from mamba_train.formats.checkpoint import (CKPT_CONFIG_KEY, CKPT_MODEL_PREFIX, RNG_KEY,
                                            RUN_CONFIG_KEY, CheckpointError, run_config_of)

REPO = Path(__file__).resolve().parents[1]
CFG = MambaLMConfig(d_model=32, n_layer=1, vocab_size=4096, ssm_cfg={"d_state": 8})


class Payload:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def genuine(extra: dict | None = None) -> dict:
    torch.manual_seed(0)
    model = build_model(CFG, backend="reference")
    return {"state_dict": {CKPT_MODEL_PREFIX + k: v for k, v in model.state_dict().items()},
            "global_step": 3, CKPT_CONFIG_KEY: CFG.to_dict(),
            RUN_CONFIG_KEY: "data:\n  tokenizer: default\n  seq_len: 64\n", **(extra or {})}


@pytest.fixture
def evil(tmp_path):
    marker = tmp_path / "PAYLOAD_RAN"
    path = tmp_path / "shared model.ckpt"  # a space: the message must name it as it is
    torch.save(genuine({"notes": Payload(marker)}), path)
    yield path, marker
    assert not marker.exists(), "the checkpoint's payload ran"


def _one_line_naming(text: str, path: Path) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, text
    assert str(path) in lines[0] and "refused" in lines[0], lines[0]
    return lines[0]


def test_the_payload_really_runs_when_unpickled_unrestricted(evil):
    """The fixture is a real attack: torch.load without weights_only executes it."""
    path, marker = evil
    torch.load(path, weights_only=False)  # noqa: S614 -- the point of this test
    assert marker.exists()
    marker.unlink()


def test_load_model_refuses(evil):
    path, _ = evil
    with pytest.raises(CheckpointError) as err:
        load_model(path, backend="reference")
    line = _one_line_naming(str(err.value), path)
    assert "posix.system" in line or "os.system" in line
    with pytest.raises(CheckpointError):
        run_config_of(path)


@pytest.mark.parametrize("layout", ["mamba_ssm", "transformers"])
def test_weight_files_of_model_directories_are_refused_too(layout, tmp_path):
    """``pytorch_model.bin`` of a mamba_ssm or transformers directory: the same refusal."""
    marker = tmp_path / "PAYLOAD_RAN"
    src = tmp_path / "model"
    build_model(CFG, backend="reference").save_pretrained(src)
    if layout == "transformers":
        from mamba_train.formats.hf import to_hf_config
        (src / "config.json").write_text(to_hf_config(CFG).to_json_string())
    state = torch.load(src / "pytorch_model.bin", weights_only=True)
    torch.save({**state, "notes": Payload(marker)}, src / "pytorch_model.bin")
    with pytest.raises(CheckpointError) as err:
        load_model(src, backend="reference")
    _one_line_naming(str(err.value), src)
    assert not marker.exists()


def test_eval_and_export_clis_refuse_in_one_line(evil, tmp_path, capsys):
    from mamba_train.cli.eval import main as eval_main
    from mamba_train.cli.export import main as export_main

    path, _ = evil
    assert eval_main([f"ckpt={path}", "tasks=local_mc", "limit=2", "device=cpu"]) == 1
    _one_line_naming(capsys.readouterr().err, path)
    for fmt in ("hf", "mamba_ssm"):
        assert export_main([f"ckpt={path}", f"out={tmp_path / fmt}", f"format={fmt}"]) == 1
        _one_line_naming(capsys.readouterr().err, path)
        assert not (tmp_path / fmt / "config.json").exists()


def test_lm_eval_adapter_refuses(evil):
    pytest.importorskip("lm_eval")
    from mamba_train.evaluation.lm_eval_adapter import MambaTrainLM

    path, _ = evil
    with pytest.raises(CheckpointError) as err:
        MambaTrainLM(pretrained=str(path), device="cpu")
    _one_line_naming(str(err.value), path)


@pytest.mark.slow  # lm-eval's CLI indexes its ~15k task files before it builds the model
def test_lm_eval_cli_refuses_in_one_line(evil, capsys):
    pytest.importorskip("lm_eval")
    from mamba_train.cli.lm_eval import main

    path, _ = evil
    assert main(["--model", "mamba_train", "--model_args", f"pretrained={path}",
                 "--device", "cpu", "--tasks", "local_mc"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err, err  # lm-eval logs its own lines first; ours is the last
    _one_line_naming(err.strip().splitlines()[-1], path)


INIT = ["model=source", "data.seq_len=64", "data.micro_batch_size=4",
        "train.global_batch_tokens=256", "data.num_workers=0", "logger=csv",
        "callbacks.progress_bar=null", "trainer.max_steps=1", "trainer.limit_val_batches=0",
        "trainer.accelerator=cpu", "trainer.precision=32-true"]


@pytest.mark.parametrize("resuming", [False, True], ids=["fresh", "resuming"])
def test_init_from_refuses_fresh_and_when_resuming(evil, tmp_path, resuming):
    """Resuming reads only the source's config, and that read must be just as safe."""
    from mamba_train.train import train
    from mamba_train.training.run.init_from import InitFromError

    path, _ = evil
    run_dir = tmp_path / "run"
    if resuming:  # a run directory that already holds a (genuine) checkpoint
        (run_dir / "checkpoints").mkdir(parents=True)
        torch.save(genuine(), run_dir / "checkpoints" / "last.ckpt")
    cfg = compose_config([*INIT, f"init_from={path}", f"run_dir={run_dir}", "ckpt_path=last"],
                         tmp_path / "out")
    with pytest.raises(InitFromError) as err:
        train(cfg)
    _one_line_naming(str(err.value), path)


def test_genuine_checkpoints_with_numpy_rng_state_load(tmp_path):
    """Older checkpoints stored ``np.random.get_state()`` itself (an ndarray): still data."""
    path = tmp_path / "old.ckpt"
    rng = {"python": None, "numpy": np.random.get_state(), "torch": torch.get_rng_state(), "cuda": None}
    want = genuine({RNG_KEY: rng, "extra_numpy": np.arange(5, dtype=np.float64)})
    torch.save(want, path)
    model = load_model(path, backend="reference")
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, want["state_dict"][CKPT_MODEL_PREFIX + key]), key
    assert run_config_of(path) == {"data": {"tokenizer": "default", "seq_len": 64}}


def test_no_unrestricted_unpickling_in_the_package():
    # Lightning's ``save_checkpoint(weights_only=False)`` means "write the full checkpoint"
    # (optimizer, loops): it writes, it never unpickles, so only the other uses count.
    offenders = [f"{p.relative_to(REPO)}:{i}" for p in (REPO / "mamba_train").rglob("*.py")
                 for i, line in enumerate(p.read_text().splitlines(), 1)
                 if "weights_only=False" in line.replace(" ", "") and "save_checkpoint(" not in line]
    assert not offenders


def test_reading_a_checkpoint_for_evaluation_imports_no_lightning(tmp_path):
    """The lm-eval adapter reads the run config and weights through ``formats``: neither
    Lightning nor the LightningModule is imported to evaluate a checkpoint."""
    import subprocess
    import sys

    pytest.importorskip("lm_eval")
    path = tmp_path / "last.ckpt"
    torch.save(genuine(), path)
    code = ("import sys; from mamba_train.evaluation.lm_eval_adapter import MambaTrainLM; "
            f"lm = MambaTrainLM(pretrained={str(path)!r}, device='cpu'); "
            "assert lm.tokenizer_source == 'default', lm.tokenizer_source; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', "
            "'pytorch_lightning') or m.startswith('mamba_train.training')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"
