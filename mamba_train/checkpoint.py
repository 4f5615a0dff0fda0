"""Weights and checkpoint loading, ``load_model``: one entry for every place weights come from
(training resume checks, evaluation, export, the Python API). Below ``training/``, ``evaluation/``
and ``export/``; imports only ``models/`` and the format readers beside it.

Accepts a ``mamba_ssm``-format directory, a Hugging Face ``transformers`` directory
(``MambaForCausalLM`` / ``Mamba2ForCausalLM``, or the hybrids ``NemotronHForCausalLM``,
``BambaForCausalLM``, ``FalconH1ForCausalLM``), or a Lightning training checkpoint (``.ckpt``).
Weights are assigned into a meta-device skeleton, so no init routine runs after loading and
every tensor is bit-identical to the file (transformers >= 5 re-runs ``_init_weights`` after
``from_pretrained``, which has overwritten trained weights -- Δ bias in some versions, out_proj
in 5.23 (see hf_format.py): we never do).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import torch

from mamba_train.errors import MambaTrainError
from mamba_train.models.config import MambaLMConfig
from mamba_train.models.lm import MambaLM

CKPT_MODEL_PREFIX = "model."
# transformers' hybrid families (formats/hf_hybrids.py)
HYBRID_MODEL_TYPES = ("nemotron_h", "bamba", "falcon_h1", "granitemoehybrid")
CKPT_CONFIG_KEY = "mamba_train_model_config"


class CheckpointError(MambaTrainError, ValueError):
    """A path that is not a loadable model; the message says what was expected."""


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
    return model


def read_lightning_checkpoint(path: Path) -> tuple[MambaLMConfig, dict[str, torch.Tensor]]:
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{path} is not a Lightning checkpoint (no 'state_dict' key)")
    if CKPT_CONFIG_KEY not in ckpt:
        raise CheckpointError(
            f"{path} was not written by mamba_train (no '{CKPT_CONFIG_KEY}' entry), so the model "
            "config is unknown"
        )
    config = MambaLMConfig.from_dict(ckpt[CKPT_CONFIG_KEY])
    state = {k[len(CKPT_MODEL_PREFIX):]: v for k, v in ckpt["state_dict"].items()
             if k.startswith(CKPT_MODEL_PREFIX)}
    return config, state


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
    if raw.get("model_type") in HYBRID_MODEL_TYPES:
        from mamba_train.formats.hf_hybrids import read_hf_hybrid
        from mamba_train.hf_format import _read_weight_files, decode_special_floats
        return read_hf_hybrid(decode_special_floats(raw), _read_weight_files(path), str(path))
    if raw.get("model_type") in ("mamba", "mamba2"):
        from mamba_train.hf_format import read_hf
        return read_hf(path)
    from mamba_train.models.mamba_ssm_format import read_mamba_ssm
    return read_mamba_ssm(path)


def load_model(path: str | Path, backend: str = "auto", device=None) -> MambaLM:
    config, state = read_weights(path)
    return model_from_state_dict(config, state, backend=backend, device=device, source=str(path))
