"""Building a model: config -> initialised ``MambaLM`` (or an uninitialised meta skeleton)."""

from __future__ import annotations

from typing import Any, Mapping

import torch

from mamba_train.models.config import MambaLMConfig
from mamba_train.models.lm import MambaLM


def as_config(config: MambaLMConfig | Mapping[str, Any]) -> MambaLMConfig:
    if isinstance(config, MambaLMConfig):
        return config
    return MambaLMConfig.from_dict(dict(config))


def build_model(config: MambaLMConfig | Mapping[str, Any], backend: str = "auto",
                device: str | torch.device | None = None,
                dtype: torch.dtype | None = None,
                kernels: Mapping[str, Any] | None = None) -> MambaLM:
    """A freshly initialised model (fp32 parameters unless ``dtype`` says otherwise).

    The modules are created on the meta device and initialised once after ``to_empty``, so a
    2.8B model does not pay for PyTorch's default init followed by ours. ``device="meta"``
    returns the uninitialised skeleton (parameter counting, sharded materialisation).
    """
    config = as_config(config)
    model = MambaLM(config, backend=backend, device="meta", dtype=dtype)
    if device is not None and torch.device(device).type == "meta":
        return model
    if device is None:
        device = "cuda" if model.backend == "fused" else "cpu"
    model.to_empty(device=device)
    model.reset_parameters()
    if kernels is not None:  # the run's ``kernels`` block (what training ran: ``model.kernels``)
        from mamba_train.models.kernels import apply_kernels
        model.kernels = apply_kernels(model, **kernels)
    return model
