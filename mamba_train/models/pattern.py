"""Layer patterns: which sublayers a hybrid model stacks, in Megatron-LM's notation.

A pattern is a string of sublayer symbols, each a pre-norm residual sublayer
(``x = x + f(norm(x))``), after Megatron-LM's ``hybrid_override_pattern`` (which Nemotron-H's
``config.json`` carries as is):

* ``M`` -- an SSM mixer (the model's ``ssm_cfg.layer``: Mamba1, Mamba2 or Mamba3);
* ``*`` -- causal self-attention (``attn_cfg``);
* ``P`` -- SSM and attention side by side on the same normalised input, outputs summed
  (Falcon-H1's decoder layer);
* ``-`` -- an MLP (``d_intermediate`` wide, ``mlp_cfg``);
* ``E`` -- a mixture of experts (``moe_cfg``, ``models/moe.py``), grouped like ``-``.

Sublayers group into blocks, the modules under ``backbone.layers``: a mixer symbol opens a block
and an ``-`` right after it joins that block as its MLP (``norm``/``mixer`` then ``norm2``/
``mlp``, mamba_ssm's ``Block``); any other ``-`` is a block of its own (``norm``/``mlp``). So
``M-M-*-`` is three blocks, each a mixer with its MLP, and ``MM-M*-`` is four: M, M-, M, *-.

Without a pattern (``layer_pattern=""``) a config means what it always did in mamba_ssm: ``n_layer``
blocks, attention at ``attn_layer_idx``, the SSM mixer elsewhere, an MLP after every mixer when
``d_intermediate > 0``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mamba_train.errors import MambaTrainError

SSM, ATTENTION, PARALLEL, MLP = "M", "*", "P", "-"
MOE = "E"
MIXER_SYMBOLS = (SSM, ATTENTION, PARALLEL)
SYMBOLS = MIXER_SYMBOLS + (MLP, MOE)

MLP_ACTIVATIONS = ("swiglu", "relu2")
MLP_DEFAULTS: dict[str, Any] = dict(act="swiglu", bias=False, multiple_of=128)

# µP-style multipliers (Falcon-H1's names in transformers' FalconH1Config, see
# models/falcon_h1/configuration_falcon_h1.py): where each one multiplies
MULTIPLIER_DEFAULTS: dict[str, Any] = dict(
    embedding=1.0,   # the embedding output
    lm_head=1.0,     # the logits
    attn_in=1.0,     # the attention's input (after the norm)
    attn_out=1.0,    # the attention's output
    key=1.0,         # the attention keys (before the rotary embedding)
    ssm_in=1.0,      # the SSM mixer's input (after the norm)
    ssm_out=1.0,     # the SSM mixer's output
    mlp_gate=1.0,    # the gated MLP's gate pre-activation
    mlp_down=1.0,    # the MLP's output
    ssm_zxbcdt=(1.0, 1.0, 1.0, 1.0, 1.0),  # Mamba-2 in_proj output sections z, x, B, C, dt
)


@dataclass(frozen=True)
class BlockSpec:
    """One module of ``backbone.layers``: its mixer symbol (None: an MLP-only block), whether
    an MLP follows the mixer, and whether that MLP is a mixture of experts (``E``)."""

    mixer: str | None
    mlp: bool
    moe: bool = False

    @property
    def symbols(self) -> str:
        return (self.mixer or "") + ((MOE if self.moe else MLP) if self.mlp else "")

    @property
    def has_ssm(self) -> bool:
        return self.mixer in (SSM, PARALLEL)

    @property
    def has_attention(self) -> bool:
        return self.mixer in (ATTENTION, PARALLEL)


class PatternError(MambaTrainError, ValueError):
    """A layer pattern that does not parse; the message names the offending symbol."""


def parse_pattern(pattern: str) -> list[BlockSpec]:
    """The blocks of a pattern string (see the module docstring)."""
    bad = sorted({c for c in pattern if c not in SYMBOLS})
    if bad:
        raise PatternError(
            f"model.layer_pattern {pattern!r} has symbols {bad}; use M (SSM mixer), * (attention), "
            "P (SSM and attention in parallel), - (MLP) and E (mixture of experts)")
    blocks: list[BlockSpec] = []
    for char in pattern:
        if char not in (MLP, MOE):
            blocks.append(BlockSpec(char, False))
        elif blocks and blocks[-1].mixer is not None and not blocks[-1].mlp:
            blocks[-1] = BlockSpec(blocks[-1].mixer, True, char == MOE)
        else:
            blocks.append(BlockSpec(None, True, char == MOE))
    return blocks


def derived_blocks(n_layer: int, attn_layer_idx, d_intermediate: int) -> list[BlockSpec]:
    """mamba_ssm's layout: attention at ``attn_layer_idx``, the SSM mixer elsewhere."""
    attn = {int(i) for i in attn_layer_idx}
    return [BlockSpec(ATTENTION if i in attn else SSM, d_intermediate > 0) for i in range(n_layer)]


def pattern_of(blocks: list[BlockSpec]) -> str:
    return "".join(b.symbols for b in blocks)


def check_layout(cfg) -> None:
    """Raise :class:`PatternError` naming the field when the pattern, MLP or multipliers of a
    ``MambaLMConfig`` do not fit together."""
    blocks = cfg.blocks
    if cfg.layer_pattern:
        if cfg.attn_layer_idx:
            raise PatternError(
                "model.attn_layer_idx and model.layer_pattern both place attention layers; "
                "keep one (the pattern's * and P symbols)")
        if len(blocks) != cfg.n_layer:
            raise PatternError(
                f"model.layer_pattern {cfg.layer_pattern!r} groups into {len(blocks)} blocks "
                f"({' '.join(b.symbols for b in blocks)}); set n_layer={len(blocks)}")
        has_mlp = any(b.mlp and not b.moe for b in blocks)
        if has_mlp != (cfg.d_intermediate > 0):
            raise PatternError(
                f"model.layer_pattern {'has' if has_mlp else 'has no'} MLP sublayers (-) but "
                f"d_intermediate={cfg.d_intermediate}: set the MLP width > 0 exactly when the "
                "pattern has an MLP")
    mlp = cfg.mlp_kwargs()
    unknown = set(mlp) - set(MLP_DEFAULTS)
    if unknown:
        raise PatternError(f"model.mlp_cfg has unknown keys {sorted(unknown)}; valid: "
                           f"{sorted(MLP_DEFAULTS)}")
    if mlp["act"] not in MLP_ACTIVATIONS:
        raise PatternError(f"model.mlp_cfg.act must be one of {MLP_ACTIVATIONS}, got "
                           f"{mlp['act']!r}")
    if mlp["act"] != "swiglu" and cfg.multiplier("mlp_gate") != 1:
        raise PatternError(f"model.multipliers.mlp_gate scales a gate: it needs mlp_cfg.act="
                           f"swiglu, got {mlp['act']!r}")
    if not isinstance(mlp["multiple_of"], int) or mlp["multiple_of"] <= 0:
        raise PatternError(f"model.mlp_cfg.multiple_of must be a positive integer, got "
                           f"{mlp['multiple_of']!r}")
    unknown = set(cfg.multipliers) - set(MULTIPLIER_DEFAULTS)
    if unknown:
        raise PatternError(f"model.multipliers has unknown keys {sorted(unknown)}; valid: "
                           f"{sorted(MULTIPLIER_DEFAULTS)}")
    zxbcdt = cfg.multiplier("ssm_zxbcdt")
    if len(zxbcdt) != 5:
        raise PatternError(f"model.multipliers.ssm_zxbcdt needs 5 values (z, x, B, C, dt), got "
                           f"{list(zxbcdt)}")
    if any(v != 1 for v in zxbcdt) and cfg.layer != "Mamba2":
        raise PatternError("model.multipliers.ssm_zxbcdt scales a Mamba-2 in_proj; "
                          f"ssm_cfg.layer is {cfg.layer}")
    d_ssm = cfg.ssm_cfg.get("d_ssm")
    if any(v != 1 for v in zxbcdt) and d_ssm not in (None, cfg.ssm_d_inner):
        raise PatternError(f"model.multipliers.ssm_zxbcdt scales an in_proj of [z, x, B, C, dt] "
                           f"only; ssm_cfg.d_ssm={d_ssm} adds a gated-MLP part: unset one")
