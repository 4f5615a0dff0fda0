"""Cross-entropy of the LM head without materialising the full (tokens × vocab) logits.

At 16k tokens × 50k vocab the logits are 1.65 GB in bf16, and the fp32 log-probabilities that
``F.cross_entropy`` saves for backward another 3.3 GB. ``linear_cross_entropy`` walks the tokens
in chunks: for each chunk it computes the logits (matmul in the autocast dtype), the loss in
fp32, and -- in the same pass -- the gradients w.r.t. the hidden states and the head weight, so
nothing of size tokens × vocab is kept for backward and no matmul is recomputed. Peak extra
memory is one chunk of fp32 logits.

Written by hand because the library versions of this (Liger's fused linear cross-entropy) are
Triton-only and measured slower than this simple form on Mamba at micro-batch 8
(shared/reference/training-facts.md); this one runs on CPU and GPU alike.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size: int, compute_dtype):
        needs_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        n_tokens = hidden.shape[0]
        valid_all = targets != IGNORE_INDEX
        n_valid = valid_all.sum().clamp(min=1)
        w = weight.to(compute_dtype)
        acc = torch.promote_types(compute_dtype, torch.float32)  # fp32, or fp64 for fp64 inputs
        loss_sum = torch.zeros((), dtype=acc, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if needs_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if needs_grad else None
        for start in range(0, n_tokens, chunk_size):
            end = min(start + chunk_size, n_tokens)
            h = hidden[start:end].to(compute_dtype)
            t = targets[start:end]
            valid = valid_all[start:end]
            logits = (h @ w.t()).to(acc)  # (c, V) in fp32: the loss is computed in fp32
            lse = torch.logsumexp(logits, dim=-1)
            safe_t = t.clamp(min=0)
            target_logit = logits.gather(1, safe_t[:, None]).squeeze(1)
            loss_sum += ((lse - target_logit) * valid).sum()
            if needs_grad:
                # d(sum of losses)/d(logits) = softmax - onehot, zero on ignored tokens
                probs = logits.sub_(lse[:, None]).exp_()
                probs[torch.arange(end - start, device=probs.device), safe_t] -= 1.0
                g = probs.to(compute_dtype)
                # ignored tokens: zero their rows through the (c, D) operands, not the (c, V)
                # probabilities (one full pass over the chunk less)
                keep = valid[:, None].to(compute_dtype)
                grad_hidden[start:end] = ((g @ w) * keep).to(hidden.dtype)
                grad_weight += (g.t() @ (h * keep)).to(acc)
        if needs_grad:
            ctx.save_for_backward(grad_hidden, grad_weight, n_valid)
            ctx.weight_dtype = weight.dtype
        return loss_sum / n_valid

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight, n_valid = ctx.saved_tensors
        scale = grad_loss / n_valid
        gh = grad_hidden * scale.to(grad_hidden.dtype) if ctx.needs_input_grad[0] else None
        gw = (grad_weight * scale).to(ctx.weight_dtype) if ctx.needs_input_grad[1] else None
        return gh, gw, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk_size: int = 4096) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ weight.T`` against ``targets`` (-100 = ignore).

    hidden: (N, D); weight: (V, D); targets: (N,) int64. Matmuls run in the autocast dtype when
    autocast is on (bf16 on GPU), softmax and loss in fp32.
    """
    if torch.is_autocast_enabled(hidden.device.type):
        compute_dtype = torch.get_autocast_dtype(hidden.device.type)
    else:
        compute_dtype = torch.promote_types(hidden.dtype, weight.dtype)
    with torch.autocast(hidden.device.type, enabled=False):
        return _LinearCrossEntropy.apply(hidden, weight, targets, chunk_size, compute_dtype)
