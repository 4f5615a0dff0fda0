"""The language model: embedding -> N pre-norm residual blocks -> final norm -> LM head.

The blocks follow the config's layer pattern (``models/pattern.py``): SSM, attention or
parallel SSM+attention mixers, each optionally followed by an MLP, and MLP-only blocks.

Module tree and ``state_dict`` keys are identical to ``mamba_ssm.MambaLMHeadModel``
(``backbone.embedding``, ``backbone.layers.N.{norm,mixer,norm2,mlp}``, ``backbone.norm_f``,
``lm_head``), whichever backend builds the mixers.
"""

from __future__ import annotations

from collections import namedtuple
from pathlib import Path

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from mamba_train.models.attention import CausalSelfAttention
from mamba_train.models.backend import add_norm_fn, mixer_classes, resolve_backend
from mamba_train.models.config import MambaLMConfig
from mamba_train.models.init import init_weights
from mamba_train.models.layers import make_mlp, make_norm, scale_in_proj_sections
from mamba_train.models.loss import linear_cross_entropy
from mamba_train.models.moe import MoE, aux_loss
from mamba_train.models.pattern import ATTENTION, PARALLEL, SSM

# balance: the mixture-of-experts balancing terms included in ``loss`` (None without them)
CausalLMOutput = namedtuple("CausalLMOutput", ["logits", "loss", "balance"],
                            defaults=(None, None, None))


class ParallelMixer(nn.Module):
    """SSM and attention on the same normalised input, outputs summed (Falcon-H1's layer):
    ``ssm(x * ssm_in) * ssm_out + attn(x * attn_in) * attn_out``."""

    def __init__(self, ssm: nn.Module, attn: nn.Module, multipliers: dict[str, float]):
        super().__init__()
        self.ssm, self.attn = ssm, attn
        self.mult = multipliers

    def forward(self, hidden, seq_idx=None):
        m = self.mult
        y = _scaled(self.ssm(_scaled(hidden, m["ssm_in"]), seq_idx=seq_idx), m["ssm_out"])
        a = _scaled(self.attn(_scaled(hidden, m["attn_in"]), seq_idx=seq_idx), m["attn_out"])
        return y + a


def _scaled(x: torch.Tensor, multiplier: float) -> torch.Tensor:
    return x if multiplier == 1 else x * multiplier


def _ssm_mixer(config: MambaLMConfig, layer_idx: int, backend: str, factory: dict) -> nn.Module:
    mixer = mixer_classes(backend)[config.layer](config.d_model, layer_idx=layer_idx,
                                                 **config.mixer_kwargs(), **factory)
    zxbcdt = tuple(config.multiplier("ssm_zxbcdt"))
    if any(v != 1 for v in zxbcdt):
        scale_in_proj_sections(mixer, zxbcdt)
    return mixer


def _attention(config: MambaLMConfig, layer_idx: int, factory: dict) -> nn.Module:
    return CausalSelfAttention(config.d_model, layer_idx=layer_idx, **config.attn_kwargs(),
                               key_multiplier=config.multiplier("key"), **factory)


class Block(nn.Module):
    """Add -> norm -> mixer (-> add -> norm2 -> MLP); returns (hidden, residual) like mamba_ssm.

    The mixer is an SSM, attention, or both in parallel (``models/pattern.py``); a block without
    a mixer is ``norm`` -> ``mlp``. ``checkpoint_activations`` (set by
    ``training/step/activation_checkpointing.py``): keep only the inputs for the backward and
    recompute the block there."""

    checkpoint_activations: bool = False

    def __init__(self, config: MambaLMConfig, layer_idx: int, backend: str, device=None, dtype=None):
        super().__init__()
        factory = dict(device=device, dtype=dtype)
        spec = config.blocks[layer_idx]
        self.layer_idx = layer_idx
        self.residual_in_fp32 = config.residual_in_fp32
        self._add_norm = add_norm_fn(backend, config.fused_add_norm)
        self.norm = make_norm(config.d_model, config.rms_norm, config.norm_epsilon, **factory)
        kind = {ATTENTION: "attn", SSM: "ssm"}.get(spec.mixer)
        self.in_multiplier = config.multiplier(f"{kind}_in") if kind else 1.0
        self.out_multiplier = config.multiplier(f"{kind}_out") if kind else 1.0
        if spec.mixer == ATTENTION:
            self.mixer = _attention(config, layer_idx, factory)
        elif spec.mixer == SSM:
            self.mixer = _ssm_mixer(config, layer_idx, backend, factory)
        elif spec.mixer == PARALLEL:
            mult = {k: config.multiplier(k) for k in ("ssm_in", "ssm_out", "attn_in", "attn_out")}
            self.mixer = ParallelMixer(_ssm_mixer(config, layer_idx, backend, factory),
                                       _attention(config, layer_idx, factory), mult)
        else:
            self.mixer = None
        if spec.mlp and spec.mixer is not None:
            self.norm2 = make_norm(config.d_model, config.rms_norm, config.norm_epsilon, **factory)
        if spec.moe:
            self.mlp = MoE(config.d_model, config.moe_kwargs(),
                           down_multiplier=config.multiplier("mlp_down"), **factory)
        else:
            self.mlp = make_mlp(config.d_model, config.d_intermediate, **config.mlp_kwargs(),
                                gate_multiplier=config.multiplier("mlp_gate"),
                                down_multiplier=config.multiplier("mlp_down"),
                                **factory) if spec.mlp else None

    @property
    def ssm_mixer(self) -> nn.Module | None:
        """The block's SSM mixer (inside a parallel mixer too), or None."""
        return self.mixer.ssm if isinstance(self.mixer, ParallelMixer) else self.mixer

    def forward(self, hidden, residual=None, seq_idx=None):
        if self.checkpoint_activations and torch.is_grad_enabled():
            # no RNG state to restore: the blocks have no stochastic layers
            return checkpoint(self._forward, hidden, residual, seq_idx, use_reentrant=False,
                              preserve_rng_state=False)
        return self._forward(hidden, residual, seq_idx)

    def _forward(self, hidden, residual, seq_idx):
        hidden, residual = self._add_norm(hidden, residual, self.norm, self.residual_in_fp32)
        if self.mixer is None:
            return self.mlp(hidden), residual
        hidden = _scaled(self.mixer(_scaled(hidden, self.in_multiplier), seq_idx=seq_idx),
                         self.out_multiplier)
        if self.mlp is not None:
            hidden, residual = self._add_norm(hidden, residual, self.norm2, self.residual_in_fp32)
            hidden = self.mlp(hidden)
        return hidden, residual


class Backbone(nn.Module):
    def __init__(self, config: MambaLMConfig, backend: str, device=None, dtype=None):
        super().__init__()
        factory = dict(device=device, dtype=dtype)
        self.residual_in_fp32 = config.residual_in_fp32
        self._add_norm = add_norm_fn(backend, config.fused_add_norm)
        self.embedding = nn.Embedding(config.padded_vocab_size, config.d_model,
                                      padding_idx=config.padding_idx, **factory)
        self.layers = nn.ModuleList(
            Block(config, i, backend, **factory) for i in range(config.n_layer)
        )
        self.norm_f = make_norm(config.d_model, config.rms_norm, config.norm_epsilon, **factory)
        self.embedding_multiplier = config.multiplier("embedding")

    def forward(self, input_ids, seq_idx=None):
        hidden, residual = _scaled(self.embedding(input_ids), self.embedding_multiplier), None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual, seq_idx=seq_idx)
        return self._add_norm(hidden, residual, self.norm_f, self.residual_in_fp32, prenorm=False)


class MambaLM(nn.Module):
    """A Mamba / Mamba-2 / hybrid causal LM; ``model(input_ids).logits`` as in mamba_ssm.

    Build with ``mamba_train.build_model(config, backend=...)`` (initialised) or directly
    (``device="meta"`` gives an uninitialised skeleton; call ``reset_parameters()`` after
    ``to_empty``).
    """

    def __init__(self, config: MambaLMConfig, backend: str = "auto", device=None, dtype=None):
        super().__init__()
        self.config = config
        self.backend = resolve_backend(backend)
        self.backbone = Backbone(config, self.backend, device=device, dtype=dtype)
        self.lm_head = nn.Linear(config.d_model, config.padded_vocab_size, bias=False,
                                 device=device, dtype=dtype)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_embeddings:
            self.lm_head.weight = self.backbone.embedding.weight

    def reset_parameters(self) -> None:
        """Re-run the full mamba_ssm initialisation (idempotent; see ``models/init.py``)."""
        self.tie_weights()
        init_weights(self, self.config.n_layer, **self.config.initializer_cfg)

    def hidden_states(self, input_ids: torch.Tensor, seq_idx: torch.Tensor | None = None):
        """Final-norm hidden states (B, L, d_model): the LM head is left to the caller (chunked loss).

        Times ``multipliers.lm_head``: Falcon-H1 scales the logits, and scaling the head's input
        is the same product, so every caller of ``lm_head`` gets it."""
        return _scaled(self.backbone(input_ids, seq_idx=seq_idx), self.config.multiplier("lm_head"))

    def forward(self, input_ids: torch.Tensor, seq_idx: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, num_last_tokens: int = 0,
                loss_chunk_size: int = 4096) -> CausalLMOutput:
        """Logits (B, L, V_padded) like mamba_ssm; with ``labels`` (-100 = ignore) the mean
        cross-entropy instead, computed chunk-wise without materialising the logits, plus the
        mixture-of-experts balancing terms where ``moe_cfg`` has them (``models/moe.py``)."""
        hidden = self.hidden_states(input_ids, seq_idx=seq_idx)
        if labels is not None:
            loss = linear_cross_entropy(hidden.flatten(0, 1), self.lm_head.weight,
                                        labels.flatten(), chunk_size=loss_chunk_size)
            balance = aux_loss(self) if self.config.n_moe_layers else None
            return CausalLMOutput(loss=loss if balance is None else loss + balance,
                                  balance=balance)
        if num_last_tokens > 0:
            hidden = hidden[:, -num_last_tokens:]
        return CausalLMOutput(logits=self.lm_head(hidden))

    def num_parameters(self, exclude_embedding: bool = False) -> int:
        params = {id(p): p for p in self.parameters()}  # tied weights once
        n = sum(p.numel() for p in params.values())
        if exclude_embedding:
            n -= self.backbone.embedding.weight.numel()
        return n

    def num_active_parameters(self) -> int:
        """Parameters one token computes with: all but the routed experts it is not sent to
        (``top_k`` of ``n_experts`` per mixture-of-experts layer)."""
        n = self.num_parameters()
        for module in self.modules():
            if isinstance(module, MoE):
                c = module.cfg
                routed = module.experts.fc1.weight.numel() + module.experts.fc2.weight.numel()
                n -= routed - routed * c["top_k"] // c["n_experts"]
        return n

    def save_pretrained(self, save_directory: str | Path, safe_serialization: bool = False,
                        for_mamba_ssm: bool = False) -> Path:
        """Write the mamba_ssm format (``config.json`` + ``pytorch_model.bin`` or safetensors);
        ``for_mamba_ssm``: only what mamba_ssm's own ``from_pretrained`` reads (``models/
        mamba_ssm_format.py: mamba_ssm_config``), else our fields too."""
        from mamba_train.models.mamba_ssm_format import save_mamba_ssm
        return save_mamba_ssm(self, save_directory, safe_serialization=safe_serialization,
                              for_mamba_ssm=for_mamba_ssm)
