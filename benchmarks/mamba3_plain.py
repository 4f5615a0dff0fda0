"""A plain Mamba-3 language model assembled from mamba_ssm's own pieces, for the throughput arm.

mamba_ssm 2.3.2's ``MambaLMHeadModel`` builds only Mamba1/Mamba2 blocks (``create_block``'s layer
map; Mamba3 was added to it later, state-spaces/mamba PR #968), so the plain loop's model is put
together the way that PR wires it: mamba_ssm ``Block`` (Triton fused add + RMSNorm, fp32
residual) around ``mamba_ssm.modules.mamba3.Mamba3``, a final RMSNorm, a tied LM head, and
mamba_ssm's ``_init_weights``. Same parameter names as ``MambaLMHeadModel``.
"""

from __future__ import annotations

from collections import namedtuple
from functools import partial

from torch import nn

Output = namedtuple("Output", ["logits"])


class PlainMamba3LM(nn.Module):
    def __init__(self, cfg, device="cuda"):
        from mamba_ssm.models.mixer_seq_simple import _init_weights
        from mamba_ssm.modules.block import Block
        from mamba_ssm.modules.mamba3 import Mamba3
        from mamba_ssm.ops.triton.layer_norm import RMSNorm

        super().__init__()
        if cfg.d_intermediate or cfg.attn_layer_idx:
            raise ValueError("the plain Mamba-3 arm builds pure Mamba-3 stacks only")
        kw = {k: v for k, v in cfg.mixer_kwargs().items() if k != "A_activation"}
        d, eps = cfg.d_model, cfg.norm_epsilon
        self.backbone = nn.Module()
        self.backbone.embedding = nn.Embedding(cfg.padded_vocab_size, d, device=device)
        self.backbone.layers = nn.ModuleList(
            Block(d, partial(Mamba3, layer_idx=i, **kw, device=device), nn.Identity,
                  norm_cls=partial(RMSNorm, eps=eps, device=device), fused_add_norm=True,
                  residual_in_fp32=True)
            for i in range(cfg.n_layer))
        self.backbone.norm_f = RMSNorm(d, eps=eps, device=device)
        self.lm_head = nn.Linear(d, cfg.padded_vocab_size, bias=False, device=device)
        self.apply(partial(_init_weights, n_layer=cfg.n_layer))
        self.lm_head.weight = self.backbone.embedding.weight

    def forward(self, input_ids):
        from mamba_ssm.ops.triton.layer_norm import layer_norm_fn

        hidden, residual = self.backbone.embedding(input_ids), None
        for layer in self.backbone.layers:
            hidden, residual = layer(hidden, residual)
        norm = self.backbone.norm_f
        hidden = layer_norm_fn(hidden, norm.weight, None, residual=residual, prenorm=False,
                               residual_in_fp32=True, eps=norm.eps, is_rms_norm=True)
        return Output(self.lm_head(hidden))
