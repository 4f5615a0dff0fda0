"""What a transformers model family must provide to be exported to / read from: one
:class:`HFFamily` per ``model_type`` (``formats/hf.py`` keeps the registry).

A family maps both ways between our :class:`MambaLMConfig` + mamba_ssm-named state dict and one
transformers config class + its ``*ForCausalLM`` state dict. Most families only rename a few
prefixes (``renames``); one whose layout differs more (per-layer renumbering, split or fused
projections) passes its own ``state_to_hf`` / ``state_from_hf``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

from mamba_train.errors import MambaTrainError
from mamba_train.models.config import MambaLMConfig

StateDict = dict[str, torch.Tensor]


class ExportError(MambaTrainError, ValueError):
    """A model that transformers cannot represent (or a bad export request); names the field."""


def special_token_ids(raw: Mapping[str, Any]) -> dict[str, Any]:
    """The bos/eos/pad ids a ``config.json`` sets (for ``MambaLMConfig.special_token_ids``)."""
    return {k: raw[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
            if raw.get(k) is not None}


@dataclass(frozen=True)
class HFFamily:
    """One transformers model family. Callables, so a family is data in the registry.

    Attributes:
        model_type: transformers' ``config.model_type``, the registry key (``"mamba2"``).
        architecture: the ``*ForCausalLM`` class written into ``config.json``'s ``architectures``.
        config_class: the transformers config class name (``"Mamba2Config"``).
        claims: whether an export of this :class:`MambaLMConfig` is this family's to attempt
            (e.g. by ``cfg.layer``); several families may claim one config.
        config_fields: the transformers config fields for a claimed config, or
            :class:`ExportError` naming the first field this family cannot represent.
        from_config: the :class:`MambaLMConfig` of a ``config.json`` dict of this family.
        renames: (ours, theirs) state-dict key prefixes, used unless the two below are given.
        base_model_prefix: transformers' ``base_model_prefix`` of the ``*ForCausalLM`` class; a
            directory saved from the bare base model has its keys without it.
        ssm_layer: the SSM mixer of the family's layers (our ``ssm_cfg.layer``).
        layered: the family lists its layers one by one (the hybrids): a model read from one
            keeps an explicit ``layer_pattern``, even when it is SSM-only.

    Where several families could hold a model, export tries first those it can have been read
    from: layered ones for an explicit ``layer_pattern`` (SSM-only Nemotron-H stays Nemotron-H),
    and, without SSM layers, those of its ``ssm_cfg.layer`` (attention-only Jamba stays Jamba).
    """

    model_type: str
    architecture: str
    config_class: str
    claims: Callable[[MambaLMConfig], bool]
    config_fields: Callable[[MambaLMConfig], dict[str, Any]]
    from_config: Callable[[Mapping[str, Any]], MambaLMConfig]
    renames: tuple[tuple[str, str], ...] = ()
    base_model_prefix: str = "backbone"
    ssm_layer: str = "Mamba2"
    layered: bool = False
    state_to_hf: Callable[[MambaLMConfig, Mapping[str, torch.Tensor]], StateDict] | None = None
    state_from_hf: Callable[[MambaLMConfig, Mapping[str, torch.Tensor]], StateDict] | None = None

    def hf_key(self, name: str) -> str:
        for ours, theirs in self.renames:
            if name.startswith(ours):
                return theirs + name[len(ours):]
        return name

    def our_key(self, name: str) -> str:
        for ours, theirs in self.renames:
            if name.startswith(theirs):
                return ours + name[len(theirs):]
        return name

    def to_hf(self, cfg: MambaLMConfig, state: Mapping[str, torch.Tensor]) -> StateDict:
        if self.state_to_hf is not None:
            return self.state_to_hf(cfg, state)
        return {self.hf_key(k): v for k, v in state.items()}

    def from_hf(self, cfg: MambaLMConfig, state: Mapping[str, torch.Tensor]) -> StateDict:
        if self.state_from_hf is not None:
            return self.state_from_hf(cfg, state)
        return {self.our_key(k): v for k, v in state.items()}
