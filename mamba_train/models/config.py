"""Model configuration: one dataclass that round-trips with ``mamba_ssm``'s ``config.json``.

The field names and defaults are those of ``mamba_ssm.models.config_mamba.MambaConfig`` so that a
directory written by either project loads in the other. The mixer knobs live in ``ssm_cfg`` (as
in ``mamba_ssm``) and are validated here, before any module is built, so that a bad config fails
with a message naming the field instead of an assertion deep inside a kernel.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mamba_train.errors import MambaTrainError
from mamba_train.models.config_validation import (attention_problem, mamba1_problem,
                                               mamba2_problem, mamba3_problem)
from mamba_train.models.mixer_tables import (
    ATTN_DEFAULTS, KERNEL_KEYS, MAMBA1_EXTENSION_DEFAULTS, MAMBA2_EXTENSION_DEFAULTS,
    MIXER_LAYERS, MIXER_TABLES)
from mamba_train.models.pattern import (
    MLP_DEFAULTS, MULTIPLIER_DEFAULTS, BlockSpec, PatternError, check_layout,
    derived_blocks, parse_pattern)


class ConfigError(MambaTrainError, ValueError):
    """A model configuration that cannot be built; the message says which field to change."""


@dataclass
class MambaLMConfig:
    """A Mamba / Mamba-2 / hybrid language model, in ``mamba_ssm``'s terms.

    Attributes:
        d_model: width of the residual stream.
        d_intermediate: hidden width of the gated MLP after each mixer; 0 means no MLP
            (pure Mamba); > 0 adds ``norm2`` + ``mlp.fc1``/``mlp.fc2`` to every block.
        n_layer: number of blocks.
        vocab_size: tokenizer vocabulary; the embedding is padded up to a multiple of
            ``pad_vocab_size_multiple`` (50277 -> 50280 for GPT-NeoX).
        ssm_cfg: mixer keyword arguments; ``layer`` is ``"Mamba1"`` (default, as in mamba_ssm),
            ``"Mamba2"`` or ``"Mamba3"``, the rest are the mixer's own (``d_state``, ``headdim``, ...).
        attn_layer_idx: indices of blocks whose mixer is causal self-attention (hybrids).
        attn_cfg: keyword arguments of those attention mixers (``num_heads``, ``rotary_emb_dim``...).
        rms_norm: RMSNorm (True) or LayerNorm (False) for the block and final norms.
        residual_in_fp32: keep the residual stream in fp32 under autocast.
        fused_add_norm: use the Triton add+norm kernel (fused backend only; numerically the same).
        pad_vocab_size_multiple: pad the vocabulary to this multiple (tensor-core friendly).
        tie_embeddings: share ``lm_head.weight`` with ``backbone.embedding.weight``.
        norm_epsilon: epsilon of every block/final norm (mamba_ssm's ``create_block`` default).
        initializer_cfg: extra arguments of the weight init (``initializer_range``,
            ``rescale_prenorm_residual``), as ``mamba_ssm.MambaLMHeadModel(initializer_cfg=...)``.
        layer_pattern: the sublayers, in Megatron-LM's notation (``models/pattern.py``): ``M``
            SSM mixer, ``*`` attention, ``P`` SSM and attention in parallel, ``-`` MLP; ``n_layer``
            is then the number of blocks it groups into. Empty: mamba_ssm's layout from
            ``attn_layer_idx`` and ``d_intermediate``.
        mlp_cfg: the MLPs: ``act`` (``swiglu``, mamba_ssm's gated SiLU, or ``relu2``, squared
            ReLU), ``bias``, ``multiple_of`` (the width is rounded up to it; mamba_ssm: 128).
        multipliers: µP-style constant multipliers (``models/pattern.py: MULTIPLIER_DEFAULTS``).
        moe_cfg: the mixture-of-experts sublayers (``E`` in ``layer_pattern``): experts, router,
            balancing (``models/moe.py: MOE_DEFAULTS``).
        special_token_ids: ``bos_token_id``/``eos_token_id``/``pad_token_id`` of the checkpoint this
            model came from (a transformers config.json), written back on export.
        padding_idx: the embedding row that gets no gradient and starts at zero (``nn.Embedding``'s
            ``padding_idx``), as transformers' Bamba and Falcon-H1 build theirs from
            ``pad_token_id``; set from such a config.json. None: every row trains (mamba_ssm,
            Nemotron-H).
    """

    d_model: int = 2560
    d_intermediate: int = 0
    n_layer: int = 64
    vocab_size: int = 50277
    ssm_cfg: dict = field(default_factory=dict)
    attn_layer_idx: list = field(default_factory=list)
    attn_cfg: dict = field(default_factory=dict)
    rms_norm: bool = True
    residual_in_fp32: bool = True
    fused_add_norm: bool = True
    pad_vocab_size_multiple: int = 8
    tie_embeddings: bool = True
    norm_epsilon: float = 1e-5
    initializer_cfg: dict = field(default_factory=dict)
    layer_pattern: str = ""
    mlp_cfg: dict = field(default_factory=dict)
    multipliers: dict = field(default_factory=dict)
    special_token_ids: dict = field(default_factory=dict)
    moe_cfg: dict = field(default_factory=dict)
    padding_idx: int | None = None

    # Fields that mamba_ssm's MambaConfig does not have; written to config.json only when they
    # differ from the default, so that mamba_ssm (which rejects unknown keys) loads our files.
    _EXTRA_FIELDS = ("norm_epsilon", "initializer_cfg", "layer_pattern", "mlp_cfg", "multipliers",
                    "special_token_ids", "moe_cfg", "padding_idx")

    def __post_init__(self) -> None:
        # Hydra/OmegaConf hand in DictConfig/ListConfig; normalise to plain containers.
        self.ssm_cfg = _plain(self.ssm_cfg) or {}
        self.attn_cfg = _plain(self.attn_cfg) or {}
        self.attn_layer_idx = list(_plain(self.attn_layer_idx) or [])
        self.initializer_cfg = _plain(self.initializer_cfg) or {}
        self.layer_pattern = self.layer_pattern or ""
        self.mlp_cfg = _plain(self.mlp_cfg) or {}
        self.multipliers = _plain(self.multipliers) or {}
        self.special_token_ids = _plain(self.special_token_ids) or {}
        self.moe_cfg = _plain(self.moe_cfg) or {}
        if "ssm_zxbcdt" in self.multipliers:
            self.multipliers["ssm_zxbcdt"] = tuple(self.multipliers["ssm_zxbcdt"])
        for key in ("A_init_range", "dt_limit"):  # JSON/YAML give lists; mamba_ssm uses tuples
            if key in self.ssm_cfg:
                self.ssm_cfg[key] = tuple(self.ssm_cfg[key])
        self.validate()

    # ------------------------------------------------------------------ derived quantities
    @property
    def layer(self) -> str:
        return self.ssm_cfg.get("layer", "Mamba1")

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_size_multiple
        return int(math.ceil(self.vocab_size / m) * m)

    def mixer_kwargs(self) -> dict[str, Any]:
        """The mixer's keyword arguments with mamba_ssm's defaults filled in (no ``layer``)."""
        kwargs = dict(MIXER_TABLES[self.layer][1])
        if self.layer == "Mamba2":
            kwargs.update({k: v for k, v in MAMBA2_EXTENSION_DEFAULTS.items() if k in self.ssm_cfg})
        elif self.layer == "Mamba1":
            kwargs.update(MAMBA1_EXTENSION_DEFAULTS)
        kwargs.update({k: v for k, v in self.ssm_cfg.items() if k != "layer"})
        if self.layer == "Mamba1" and kwargs["dt_rank"] == "auto":
            kwargs["dt_rank"] = math.ceil(self.d_model / 16)
        return kwargs

    @property
    def ssm_d_inner(self) -> int:
        """The SSM mixer's inner width: ``ssm_cfg.d_inner`` (Mamba-2) or ``expand * d_model``."""
        kw = self.mixer_kwargs()
        return int(kw.get("d_inner") or kw["expand"] * self.d_model)

    def attn_kwargs(self) -> dict[str, Any]:
        kwargs = dict(ATTN_DEFAULTS)
        kwargs.update(self.attn_cfg)
        return kwargs

    @property
    def blocks(self) -> list[BlockSpec]:
        """The modules of ``backbone.layers``, in order (``models/pattern.py``)."""
        if self.layer_pattern:
            return parse_pattern(self.layer_pattern)
        return derived_blocks(self.n_layer, self.attn_layer_idx, self.d_intermediate)

    @property
    def n_ssm_layers(self) -> int:
        return sum(b.has_ssm for b in self.blocks)

    @property
    def n_attention_layers(self) -> int:
        return sum(b.has_attention for b in self.blocks)

    def is_attention_layer(self, idx: int) -> bool:
        return self.blocks[idx].has_attention

    def mlp_kwargs(self) -> dict[str, Any]:
        return {**MLP_DEFAULTS, **self.mlp_cfg}

    def moe_kwargs(self) -> dict[str, Any]:
        from mamba_train.models.moe import MOE_DEFAULTS
        return {**MOE_DEFAULTS, **self.moe_cfg}

    @property
    def n_moe_layers(self) -> int:
        return sum(b.moe for b in self.blocks)

    def multiplier(self, name: str):
        return self.multipliers.get(name, MULTIPLIER_DEFAULTS[name])

    @property
    def n_residuals_per_layer(self) -> int:
        return 1 if self.d_intermediate == 0 else 2

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        for name in ("d_model", "n_layer", "vocab_size", "pad_vocab_size_multiple"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"model.{name} must be a positive integer, got {value!r}")
        if self.padding_idx is not None and not (
                isinstance(self.padding_idx, int) and 0 <= self.padding_idx < self.vocab_size):
            raise ConfigError(f"model.padding_idx must be a token id in [0, vocab_size="
                              f"{self.vocab_size}) or null, got {self.padding_idx!r}")
        if self.d_intermediate < 0:
            raise ConfigError(f"model.d_intermediate must be >= 0, got {self.d_intermediate}")
        if self.layer not in MIXER_LAYERS:
            raise ConfigError(
                f"model.ssm_cfg.layer must be one of {MIXER_LAYERS}, got {self.layer!r}"
            )
        allowed = MIXER_TABLES[self.layer][0]
        unknown = set(self.ssm_cfg) - allowed - {"layer"}
        moved = sorted(unknown & set(KERNEL_KEYS))
        if moved:
            raise ConfigError(f"model.ssm_cfg.{moved[0]} is a kernel choice, not a model key: "
                              f"set {KERNEL_KEYS[moved[0]]} instead")
        if unknown:
            raise ConfigError(
                f"model.ssm_cfg has keys {sorted(unknown)} that a {self.layer} mixer does not "
                f"take; valid keys: {sorted(allowed)}"
            )
        attn_keys = set(ATTN_DEFAULTS) | {"num_heads"}
        if set(self.attn_cfg) - attn_keys:
            raise ConfigError(f"model.attn_cfg has keys {sorted(set(self.attn_cfg) - attn_keys)} "
                              f"that attention does not take; valid keys: {sorted(attn_keys)}")
        bad_idx = [i for i in self.attn_layer_idx if not (0 <= int(i) < self.n_layer)]
        if bad_idx:
            raise ConfigError(
                f"model.attn_layer_idx {bad_idx} outside [0, n_layer={self.n_layer})"
            )
        self._validate_pattern()
        kw = self.mixer_kwargs()
        if not (0 < kw["dt_min"] <= kw["dt_max"]):
            raise ConfigError(
                f"need 0 < ssm_cfg.dt_min <= ssm_cfg.dt_max, got {kw['dt_min']}, {kw['dt_max']}"
            )
        problem = (mamba2_problem(kw, self.d_model) if self.layer == "Mamba2" else
                   mamba3_problem(kw, self.d_model) if self.layer == "Mamba3" else
                   mamba1_problem(kw, self.d_model))
        if problem is None and self.n_attention_layers:
            problem = attention_problem(self.attn_kwargs(), self.d_model,
                                        "num_heads" in self.attn_cfg)
        if problem:
            raise ConfigError(problem)
        if self.n_moe_layers:
            from mamba_train.models.moe import check_moe_cfg
            problems = check_moe_cfg(self.moe_kwargs(), self.d_model)
            if problems:
                raise ConfigError(problems[0])
        elif self.moe_cfg:
            raise ConfigError("model.moe_cfg is set but model.layer_pattern has no E "
                              "(mixture-of-experts) sublayer; add one or drop moe_cfg")

    def _validate_pattern(self) -> None:
        try:
            check_layout(self)
        except PatternError as e:
            raise ConfigError(str(e)) from None

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """The ``config.json`` content: mamba_ssm's keys, plus ours only where non-default."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in self._EXTRA_FIELDS:
                default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
                if value == default:
                    continue
            out[f.name] = _jsonable(value)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MambaLMConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ConfigError(
                f"unknown model config keys {sorted(unknown)}; valid keys: {sorted(names)}"
            )
        return cls(**data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "MambaLMConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))


def _plain(value: Any) -> Any:
    """OmegaConf containers -> plain Python containers (no-op for plain values)."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # omegaconf is a dependency, but the model must not need it
        return value
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value
