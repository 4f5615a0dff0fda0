"""The ``mamba_ssm`` directory format: ``config.json`` + ``pytorch_model.bin`` (or safetensors).

``MambaLMHeadModel.from_pretrained(dir)`` reads exactly these two files, and ``read_mamba_ssm``
reads what ``MambaLMHeadModel.save_pretrained`` writes. ``MambaLM.save_pretrained`` also records
our own fields (``MambaLMConfig._EXTRA_FIELDS``, ssm_cfg knobs mamba_ssm lacks) where they are
set; ``mamba_ssm_config`` is the ``config.json`` for mamba_ssm itself, which passes every key to
its ``MambaConfig`` and mixer constructors and so fails on any other.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mamba_train.errors import MambaTrainError
from mamba_train.fileio import atomic_write
from mamba_train.models.config import MambaLMConfig
from mamba_train.models.pattern import MLP_DEFAULTS, MULTIPLIER_DEFAULTS

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "pytorch_model.bin"
SAFE_WEIGHTS_NAME = "model.safetensors"


# mamba_ssm's MambaConfig fields (mamba_ssm/models/config_mamba.py)
MAMBA_SSM_FIELDS = ("d_model", "d_intermediate", "n_layer", "vocab_size", "ssm_cfg",
                    "attn_layer_idx", "attn_cfg", "rms_norm", "residual_in_fp32", "fused_add_norm",
                    "pad_vocab_size_multiple", "tie_embeddings")
# the eps of mamba_ssm's block / final norms (create_block's default) and of Mamba2's gated norm
MAMBA_SSM_NORM_EPS = 1e-5


class MambaSsmFormatError(MambaTrainError, ValueError):
    """A model mamba_ssm's ``MambaLMHeadModel`` cannot build; the message names the field."""


def mamba_ssm_config(cfg: MambaLMConfig) -> dict:
    """``config.json`` for mamba_ssm's ``MambaLMHeadModel.from_pretrained``: its keys only.

    What only shapes a fresh init (``initializer_cfg``, ``A_init``, ``dt_bias_init``) or training
    (``padding_idx``), and tokenizer facts (``special_token_ids``), are left out; a field that
    changes what the model computes and that mamba_ssm has no equivalent for is refused with a
    :class:`MambaSsmFormatError` naming it.
    """
    def refuse(field: str, why: str) -> MambaSsmFormatError:
        return MambaSsmFormatError(f"model.{field}: {why}; mamba_ssm's MambaLMHeadModel cannot "
                                   "build it (export format=hf, or keep mamba_train's own files)")

    if cfg.layer_pattern:
        raise refuse(f"layer_pattern={cfg.layer_pattern}", "its layout is attn_layer_idx and "
                     "d_intermediate only")
    if cfg.norm_epsilon != MAMBA_SSM_NORM_EPS:
        raise refuse(f"norm_epsilon={cfg.norm_epsilon}", f"its norms use eps={MAMBA_SSM_NORM_EPS}")
    if cfg.d_intermediate and cfg.mlp_kwargs() != MLP_DEFAULTS:
        raise refuse(f"mlp_cfg={cfg.mlp_cfg}", f"its MLP is {MLP_DEFAULTS}")
    used = sorted(k for k, v in cfg.multipliers.items()
                  if (tuple(v) if isinstance(v, list) else v) != MULTIPLIER_DEFAULTS[k])
    if used:
        raise refuse(f"multipliers {used}", "it has no multipliers")
    ssm = {k: v for k, v in cfg.ssm_cfg.items() if k not in ("A_init", "dt_bias_init")}
    kw = cfg.mixer_kwargs()
    if cfg.layer == "Mamba1":
        if kw["dt_bc_norm"]:
            raise refuse("ssm_cfg.dt_bc_norm=true", "its Mamba has no dt/B/C norms")
        for key in ("dt_bc_norm", "norm_eps"):
            ssm.pop(key, None)
    elif cfg.layer == "Mamba2":
        if ssm.pop("d_inner", None) not in (None, kw["expand"] * cfg.d_model):
            raise refuse(f"ssm_cfg.d_inner={kw['d_inner']}", "its inner width is expand*d_model")
        if ssm.pop("norm_eps", MAMBA_SSM_NORM_EPS) != MAMBA_SSM_NORM_EPS and kw["rmsnorm"]:
            raise refuse(f"ssm_cfg.norm_eps={kw['norm_eps']}",
                         f"its gated RMSNorm uses eps={MAMBA_SSM_NORM_EPS}")
    full = cfg.to_dict()
    return {**{k: full[k] for k in MAMBA_SSM_FIELDS}, "ssm_cfg": ssm}


def save_mamba_ssm(model, save_directory: str | Path, safe_serialization: bool = False,
                   for_mamba_ssm: bool = False) -> Path:
    """Write ``config.json`` + weights; ``for_mamba_ssm``: the config is ``mamba_ssm_config``
    (raises :class:`MambaSsmFormatError` before writing anything), else ours in full."""
    config = mamba_ssm_config(model.config) if for_mamba_ssm else model.config.to_dict()
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
    atomic_write(out / CONFIG_NAME, lambda p: Path(p).write_text(json.dumps(config, indent=2) + "\n"))
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
