"""A crash while a checkpoint is written never damages the previous checkpoint at that path."""

import pytest
import torch

from mamba_train.training.run.checkpoint_io import AtomicCheckpointIO


def test_crash_mid_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "w": torch.ones(3)}, path)

    real_save = torch.save

    def crashing_save(obj, f, *args, **kwargs):
        f.write(b"partial bytes of a checkpoint")  # what a killed process leaves behind
        raise KeyboardInterrupt("preempted mid-write")

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"global_step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.setattr(torch, "save", real_save)

    ckpt = torch.load(path, weights_only=True)
    assert ckpt["global_step"] == 1 and torch.equal(ckpt["w"], torch.ones(3))
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # no temp file left


def test_save_replaces_the_file(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "a.ckpt"
    io.save_checkpoint({"global_step": 1}, path)
    io.save_checkpoint({"global_step": 2}, path)
    assert torch.load(path, weights_only=True)["global_step"] == 2
