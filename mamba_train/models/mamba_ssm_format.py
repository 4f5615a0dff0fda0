"""The ``mamba_ssm`` directory format: ``config.json`` + ``pytorch_model.bin`` (or safetensors).

``MambaLMHeadModel.from_pretrained(dir)`` reads exactly these two files, so a directory written
here loads there, and ``load_mamba_ssm`` reads what ``MambaLMHeadModel.save_pretrained`` writes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mamba_train.fileio import atomic_write
from mamba_train.models.config import MambaLMConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "pytorch_model.bin"
SAFE_WEIGHTS_NAME = "model.safetensors"


def save_mamba_ssm(model, save_directory: str | Path, safe_serialization: bool = False) -> Path:
    out = Path(save_directory)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if safe_serialization:
        from safetensors.torch import save_file
        # safetensors refuses shared storage; the tied head is re-tied on load.
        if model.config.tie_embeddings:
            state.pop("lm_head.weight", None)
        atomic_write(out / SAFE_WEIGHTS_NAME, lambda p: save_file(state, p, metadata={"format": "pt"}))
    else:
        atomic_write(out / WEIGHTS_NAME, lambda p: torch.save(state, p))
    # config last: a directory with a config.json is complete
    atomic_write(out / CONFIG_NAME, lambda p: Path(p).write_text(
        json.dumps(model.config.to_dict(), indent=2) + "\n"))
    return out


def read_mamba_ssm(path: str | Path) -> tuple[MambaLMConfig, dict[str, torch.Tensor]]:
    path = Path(path)
    config = MambaLMConfig.load(path / CONFIG_NAME)
    if (path / SAFE_WEIGHTS_NAME).is_file():
        from safetensors.torch import load_file
        state = load_file(path / SAFE_WEIGHTS_NAME)
    elif (path / WEIGHTS_NAME).is_file():
        state = torch.load(path / WEIGHTS_NAME, map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(
            f"{path} has a config.json but neither {WEIGHTS_NAME} nor {SAFE_WEIGHTS_NAME}"
        )
    return config, state
