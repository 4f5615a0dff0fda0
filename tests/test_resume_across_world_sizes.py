"""A checkpoint written by 2 processes resumes on 1 process, and one written by 1 process resumes
on 2: the data position and ``train/global_loss`` continue as in an uninterrupted run.

Why this can hold: the global batch is fixed in tokens, so 2 processes at accumulation 1 and one
process at accumulation 2 consume the same 8 samples per optimizer step, and the loader stores
its position as a global sample count (``ResumableDataLoader.state_dict``), re-dealt to the new
world size on load. The losses then agree up to float summation order (DDP averages two
gradients, one process accumulates two micro-batches).
"""

from __future__ import annotations

import pytest

from test_distributed import STEPS, global_losses, run_cli

pytestmark = pytest.mark.slow  # two multi-step CLI runs per case, one of them with 2 processes


def _step_file(run_dir, step: int):
    return run_dir / "checkpoints" / f"step{step:07d}.ckpt"


@pytest.mark.parametrize("first,second", [(2, 1), (1, 2)], ids=["2to1", "1to2"])
def test_resume_on_another_world_size_continues_the_run(first, second, tmp_path):
    common = ["strategy=ddp", "train.checkpoint_every_n_steps=2", "train.keep_last_k_checkpoints=-1"]
    run_cli(tmp_path, *common, f"trainer.devices={first}", "run_name=straight")
    mid = _step_file(tmp_path / "straight", 2)
    assert mid.exists(), sorted((tmp_path / "straight" / "checkpoints").iterdir())
    run_cli(tmp_path, *common, f"trainer.devices={second}", "run_name=resumed", f"ckpt_path={mid}")

    straight, resumed = global_losses(tmp_path / "straight"), global_losses(tmp_path / "resumed")
    assert sorted(resumed) == list(range(3, STEPS + 1)), resumed  # continued after step 2, not from 1
    for step in resumed:  # same samples per step: the loader's position was carried across sizes
        assert resumed[step] == pytest.approx(straight[step], abs=1e-4), (step, straight, resumed)


@pytest.mark.parametrize("first,second", [
    (["trainer.devices=2", "strategy=fsdp"], ["trainer.devices=2", "strategy=fsdp2"]),
    (["trainer.devices=2", "strategy=fsdp2"], ["trainer.devices=2", "strategy=fsdp"]),
    (["trainer.devices=2", "strategy=fsdp"], ["trainer.devices=1"]),
    (["trainer.devices=1"], ["trainer.devices=2", "strategy=fsdp"]),
], ids=["fsdp-to-fsdp2", "fsdp2-to-fsdp", "fsdp-to-one", "one-to-fsdp"])
def test_full_checkpoint_resumes_on_the_other_fsdp(first, second, tmp_path):
    """A full checkpoint of FSDP1 or FSDP2 continues on the other (and FSDP1's on one process):
    model weights and every Adam moment on its own parameter (FSDP1 once wrote its optimizer
    state numbered in model.parameters() order, which paired moments with other parameters)."""
    common = ["train.checkpoint_every_n_steps=2", "train.keep_last_k_checkpoints=-1"]
    run_cli(tmp_path, *common, *first, "run_name=straight")
    run_cli(tmp_path, *common, *second, "run_name=resumed",
            f"ckpt_path={_step_file(tmp_path / 'straight', 2)}")
    straight, resumed = global_losses(tmp_path / "straight"), global_losses(tmp_path / "resumed")
    assert sorted(resumed) == list(range(3, STEPS + 1)), resumed
    for step in resumed:  # fp32 summation order only (another strategy or world size)
        assert resumed[step] == pytest.approx(straight[step], abs=1e-4), (step, straight, resumed)
