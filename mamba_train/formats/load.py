"""Reading weights from any supported format, and ``load_model``: one entry for every place
weights come from (training resume checks, ``init_from``, evaluation, export, the Python API).

Accepts a ``mamba_ssm``-format directory (``models/mamba_ssm_format.py``), a Hugging Face
``transformers`` directory of a registered family (``formats/hf.py``), or a mamba_train training
checkpoint (``.ckpt``, ``formats/checkpoint.py``: opened without unpickling code).
Weights are assigned into a meta-device skeleton, so no init routine runs after loading and
every tensor is bit-identical to the file (transformers >= 5 re-runs ``_init_weights`` after
``from_pretrained``, which has overwritten trained weights -- Δ bias in some versions, out_proj
in 5.23 (see formats/hf_mamba.py): we never do).
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any, Mapping

import torch

from mamba_train.formats.checkpoint import (CheckpointError, read_lightning_checkpoint, refusal,
                                            run_config_of)
from mamba_train.models.config import MambaLMConfig
from mamba_train.models.lm import MambaLM


def model_from_state_dict(config: MambaLMConfig, state: Mapping[str, torch.Tensor],
                          backend: str = "auto", device=None, source: str = "state dict") -> MambaLM:
    model = MambaLM(config, backend=backend, device="meta")
    expected = set(model.state_dict())
    state = dict(state)
    if config.tie_embeddings:
        emb, head = state.get("backbone.embedding.weight"), state.get("lm_head.weight")
        if head is not None and emb is not None and not torch.equal(head, emb):
            raise CheckpointError(
                f"{source}: tie_embeddings is true but lm_head.weight differs from "
                "backbone.embedding.weight; set tie_embeddings=false in its config.json"
            )
        state["lm_head.weight"] = emb
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise CheckpointError(
            f"{source} does not match the model config: missing {sorted(missing)[:5]}"
            f"{' ...' if len(missing) > 5 else ''}, unexpected {sorted(unexpected)[:5]}"
            f"{' ...' if len(unexpected) > 5 else ''}"
        )
    for name, tensor in model.state_dict().items():
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"{source}: {name} has shape {tuple(state[name].shape)}, the config implies "
                f"{tuple(tensor.shape)}"
            )
    if device is None:
        device = "cuda" if model.backend == "fused" else "cpu"
    model.load_state_dict({k: v.to(device) for k, v in state.items()}, assign=True)
    model.tie_weights()
    # buffers no state dict carries (the MoE statistics) are still meta: their module resets them
    for module in model.modules():
        stale = [n for n, b in module.named_buffers(recurse=False) if b.is_meta]
        for name in stale:
            setattr(module, name, torch.empty_like(getattr(module, name), device=device))
        if stale:
            module.reset_parameters()
    return model


def read_weights(path: str | Path) -> tuple[MambaLMConfig, dict[str, torch.Tensor]]:
    """(config, state dict in mamba_ssm key names) from any supported source."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if path.is_file():
        if path.suffix == ".ckpt":
            return read_lightning_checkpoint(path)
        raise CheckpointError(
            f"{path}: expected a .ckpt file or a directory with config.json (mamba_ssm or "
            "transformers format)"
        )
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        ckpts = sorted(path.glob("**/*.ckpt"))
        hint = f" (it contains checkpoints, e.g. {ckpts[-1]})" if ckpts else ""
        raise CheckpointError(f"{path} has no config.json{hint}")
    raw = json.loads(cfg_file.read_text())
    try:  # their .bin files are read with weights_only=True: refused pickles become one line
        if "model_type" in raw:  # transformers writes it; mamba_ssm's config.json has none
            from mamba_train.formats.hf import read_hf
            return read_hf(path)
        from mamba_train.models.mamba_ssm_format import read_mamba_ssm
        return read_mamba_ssm(path)
    except pickle.UnpicklingError as e:
        raise refusal(path, e) from None


def load_model(path: str | Path, backend: str = "auto", device=None) -> MambaLM:
    config, state = read_weights(path)
    return model_from_state_dict(config, state, backend=backend, device=device, source=str(path))


def tokenizer_of(source: str | Path, run_config: dict[str, Any] | None = None) -> str | None:
    """The tokenizer ``source`` was trained with, as ``data.tokenizer`` names it: a ``.ckpt``'s
    run config says (pass ``run_config`` if already read), a model directory holding tokenizer
    files is its own; None when the source records none (a bare mamba_ssm directory)."""
    path = Path(source)
    if run_config is None and path.is_file():
        run_config = run_config_of(path)
    tokenizer = ((run_config or {}).get("data") or {}).get("tokenizer")
    if tokenizer:
        return str(tokenizer)
    if path.is_dir() and any((path / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json")):
        return str(path)
    return None
