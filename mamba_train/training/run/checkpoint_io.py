"""Checkpoint writes that a crash cannot corrupt.

Lightning's ``TorchCheckpointIO`` writes the final file in place; a crash (preemption, OOM kill,
full disk) mid-write leaves a truncated ``.ckpt`` where the previous good one was. Here the
checkpoint goes to a temporary file in the same directory, is fsync'ed, and is renamed over the
target (atomic on POSIX filesystems). Remote URLs fall back to Lightning's own writer.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from mamba_train.fileio import atomic_write


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)

        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)

        atomic_write(path, write)
