"""Checkpoint writes that a crash cannot corrupt.

Lightning's ``TorchCheckpointIO`` writes the final file in place; a crash (preemption, OOM kill,
full disk) mid-write leaves a truncated ``.ckpt`` where the previous good one was. Here the
checkpoint goes to a temporary file in the same directory, is fsync'ed, and is renamed over the
target (atomic on POSIX filesystems). Remote URLs fall back to Lightning's own writer.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
