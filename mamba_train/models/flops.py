"""Analytic model FLOPs per token, for MFU.

Why analytic and not measured: ``torch.utils.flop_counter`` (and Lightning's ``measure_flops``)
only sees ATen ops, so it misses the fused ``mamba_ssm`` scan kernels entirely and counts the
reference backend's chunked scan (a different algorithm) instead. MFU is defined on *model*
FLOPs (what the architecture needs, not what a kernel happens to execute, e.g. the activation
recomputation inside the fused backward), so we count the architecture once, here.

Conventions (those of Kaplan et al. 2020 / PaLM App. B, so numbers compare with transformer MFU):

* A matmul ``(tokens × in) @ (in × out)`` costs ``2·in·out`` FLOPs per token (one multiply and one
  add per weight). The backward pass costs twice the forward (gradient w.r.t. the input and
  w.r.t. the weight), so training costs ``3 ×`` the forward: ``6·N`` per token for ``N`` matmul
  weights.
* ``N`` counts the weights of every ``nn.Linear``/``nn.Conv1d``/Δ-projection of the blocks, plus
  the LM head; of a mixture of experts, the router, the shared experts and ``top_k`` of the
  routed experts (the active parameters: a token's matmuls touch only those), plus (a ``d_model × vocab`` matmul even when tied to the embedding). The embedding
  *lookup* is free. Norm scales, biases, ``A_log``, ``D`` and elementwise work (SiLU, gating,
  softplus, RMSNorm, the softmax of the loss) are left out: together they are < 1% for every
  recipe, and leaving them out is the usual convention.
* Mixing that has no weights is counted separately (below); like attention in the PaLM formula,
  it is counted dense (no saving from causality) and ``× 3`` for training.

Sequence-mixing terms, forward, per token and per layer:

* **Mamba-1 selective scan** (``d_inner`` channels, ``d_state`` = N): per channel and state,
  discretise ``exp(Δ·A)`` (2), ``Δ·B·x`` (2), the recurrence ``h = Ā·h + B̄x`` (2) and the
  readout ``y += C·h`` (2), plus the Δ·A broadcast (1): ``9·d_inner·N``; then ``+ d_inner`` for the
  ``D·x`` skip and ``+ d_inner`` for the ``z`` gate. This is mamba_ssm's own count
  (state-spaces/mamba issue #110: ``9·B·L·D·N``, ``+B·D·L`` with D, ``+B·D·L`` with z).
* **Mamba-2 SSD, chunked** (chunk Q = ``min(chunk_size, seq_len)``, ``H`` heads of ``P`` channels,
  ``d_ssm = H·P``, ``G`` groups of state size N), per chunk of Q tokens, divided by Q:
    - intra-chunk (the quadratic, attention-like part): ``C·Bᵀ`` per group, ``2·Q²·N·G``, then the
      masked scores times ``X`` per head, ``2·Q²·P·H``  ->  ``2·Q·(N·G + d_ssm)`` per token;
    - chunk states ``Σ_t decay_t · B_t ⊗ x_t``: ``2·N·d_ssm`` per token;
    - output from the carried-in state ``C_t · state``: ``2·N·d_ssm`` per token;
    - the inter-chunk state recurrence (``2·N·d_ssm`` per *chunk*) is ``1/Q`` of the above and
      left out; the ``D`` skip adds ``d_ssm``.
  So ``2·Q·(N·G + d_ssm) + 4·N·d_ssm + d_ssm``.
* **Mamba-3 SISO, chunked** (chunk Q, ``H`` heads of ``P`` channels, ``d_inner = H·P``, state N):
  the same three terms as SSD, but B and C are per *head* (each head adds its own bias and
  RoPE angle), so the intra-chunk ``C·Bᵀ`` is ``2·Q·N·H`` per token; plus the diagonal
  correction ``q_t·k_t`` (``2·N·H``): ``2·Q·(N·H + d_inner) + 4·N·d_inner + d_inner + 2·N·H``.
  MIMO of rank R is counted as R× the state terms (``4·N·d_inner·R``) and ``R²``× the
  intra-chunk ``C·Bᵀ`` -- an approximation of what the TileLang kernels do.
* **Attention** (``n_heads·head_dim = d_attn``, sequence length T): ``Q·Kᵀ`` and ``A·V`` are each
  ``2·T·d_attn`` per token: ``4·T·d_attn`` forward, i.e. the familiar ``12·n_layer·T·d_model``
  training term when ``d_attn = d_model``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from mamba_train.models.config import MambaLMConfig


@dataclass(frozen=True)
class FlopsBreakdown:
    """Forward FLOPs per token, by term (multiply by 3 for a training step)."""

    matmul: int      # 2 · matmul weights (blocks + LM head)
    ssm: int         # selective scan / SSD, all SSM layers
    attention: int   # scores and weighted sum, all attention layers

    @property
    def forward(self) -> int:
        return self.matmul + self.ssm + self.attention


def matmul_params(config: MambaLMConfig) -> int:
    """Weights that take part in a matmul per token: every Linear/Conv1d/Δ-projection weight and
    the LM head (counted even when tied: tying shares storage, not work).

    Counted on a meta-device model (no memory, no init), so that it follows the architecture
    exactly (MLP width rounding, Mamba-2's in_proj layout, attention's extra MLP, ...)."""
    from mamba_train.models.init import DeltaProjection
    from mamba_train.models.lm import MambaLM

    from mamba_train.models.moe import MoE

    model = MambaLM(config, backend="reference", device="meta")
    total = 0
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv1d, DeltaProjection)):
            total += module.weight.numel()
        elif isinstance(module, MoE):  # the router, and the top-k of the routed experts
            c = module.cfg
            total += module.router.weight.numel() + sum(
                lin.weight.numel() for lin in (module.experts.fc1, module.experts.fc2)
            ) * c["top_k"] // c["n_experts"]
    return total


def ssm_flops_per_token(config: MambaLMConfig, seq_len: int) -> int:
    """Forward FLOPs per token of one SSM layer's scan (see the module docstring)."""
    kw = config.mixer_kwargs()
    n, d_inner = kw["d_state"], config.ssm_d_inner
    if config.layer == "Mamba1":
        return 9 * d_inner * n + 2 * d_inner
    q = min(kw["chunk_size"], seq_len)
    if config.layer == "Mamba3":
        h = d_inner // kw["headdim"]
        r = kw["mimo_rank"] if kw["is_mimo"] else 1
        return 2 * q * (n * h * r * r + d_inner * r) + 4 * n * d_inner * r + d_inner + 2 * n * h * r
    d_ssm = d_inner if kw["d_ssm"] is None else kw["d_ssm"]
    return 2 * q * (n * kw["ngroups"] + d_ssm) + 4 * n * d_ssm + d_ssm


def attention_flops_per_token(config: MambaLMConfig, seq_len: int) -> int:
    """Forward FLOPs per token of one attention layer's scores and weighted sum."""
    kw = config.attn_kwargs()
    head_dim = kw["head_dim"] or config.d_model // kw["num_heads"]
    return 4 * seq_len * kw["num_heads"] * head_dim


def flops_breakdown(config: MambaLMConfig, seq_len: int) -> FlopsBreakdown:
    # from the layer pattern: a parallel (P) block counts once in each; MLP-only blocks in neither
    n_attn, n_ssm = config.n_attention_layers, config.n_ssm_layers
    return FlopsBreakdown(
        matmul=2 * matmul_params(config),
        ssm=n_ssm * ssm_flops_per_token(config, seq_len),
        attention=n_attn * attention_flops_per_token(config, seq_len) if n_attn else 0,
    )


def flops_per_token(config: MambaLMConfig, seq_len: int, training: bool = True) -> int:
    """Model FLOPs per token at sequence length ``seq_len``: forward + backward (``3 ×`` the
    forward) when ``training``, else the forward alone. Multiply by tokens/s and divide by the
    device's peak FLOP/s for MFU."""
    forward = flops_breakdown(config, seq_len).forward
    return 3 * forward if training else forward
