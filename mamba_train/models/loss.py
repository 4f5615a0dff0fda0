"""Cross-entropy of the LM head without materialising the full (tokens × vocab) logits.

At 16k tokens × 50k vocab the logits are 1.65 GB in bf16, and the fp32 log-probabilities that
``F.cross_entropy`` saves for backward another 3.3 GB. ``linear_cross_entropy`` walks the tokens
in chunks: for each chunk it computes the logits (matmul in the autocast dtype), the loss in
fp32, and -- in the same pass -- the gradients w.r.t. the hidden states and the head weight, so
nothing of size tokens × vocab is kept for backward and no matmul is recomputed. Peak extra
memory is one chunk of fp32 logits.

Written by hand because the library versions of this (Liger's fused linear cross-entropy) are
Triton-only and measured slower than this simple form on Mamba at micro-batch 8
(figures not kept); this one runs on CPU and GPU alike.
"""

from __future__ import annotations

import functools

import torch

from mamba_train.models.loss_kernel import IGNORE_INDEX, cross_entropy_rows_, triton_available


def _cross_entropy_rows_torch(logits, targets, valid, acc, want_grad: bool):
    """The torch form of ``cross_entropy_rows_``: fp32 row losses and ``softmax - onehot`` in the
    logits' dtype. Ignored rows get loss 0; their gradient rows are not zeroed here."""
    logits32 = logits.to(acc)
    lse = torch.logsumexp(logits32, dim=-1)
    safe_t = targets.clamp(min=0)
    target_logit = logits32.gather(1, safe_t[:, None]).squeeze(1)
    losses = (lse - target_logit) * valid
    if not want_grad:
        return losses, None
    probs = logits32.sub_(lse[:, None]).exp_()
    probs[torch.arange(len(targets), device=probs.device), safe_t] -= 1.0
    return losses, probs.to(logits.dtype)


@functools.lru_cache(maxsize=None)
def _gemm_with_wider_output(device: torch.device, in_dtype: torch.dtype, out_dtype: torch.dtype) -> bool:
    """Whether ``torch.addmm(..., out_dtype=)`` runs here (CUDA builds of torch >= 2.8)."""
    a = torch.zeros(2, 2, dtype=in_dtype, device=device)
    try:
        torch.addmm(torch.zeros(2, 2, dtype=out_dtype, device=device), a, a, out_dtype=out_dtype)
    except (RuntimeError, TypeError, NotImplementedError):
        return False
    return True


def _add_matmul_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` for bf16 ``a``, ``b`` and an fp32 ``acc``: where torch can, one GEMM that
    accumulates into the fp32 matrix, instead of a bf16 product, an upcast and an add over the
    whole (vocab x d_model) matrix per chunk."""
    if a.dtype != acc.dtype and _gemm_with_wider_output(acc.device, a.dtype, acc.dtype):
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:
        acc += (a @ b).to(acc.dtype)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size: int, compute_dtype, row_kernel: bool):
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
            logits = h @ w.t()  # (c, V) in the compute dtype; the loss is computed in fp32
            if row_kernel:  # one Triton pass; the gradient overwrites the logits, ignored rows 0
                row_losses, g = cross_entropy_rows_(logits, t), logits
                keep = None
            else:
                row_losses, g = _cross_entropy_rows_torch(logits, t, valid_all[start:end], acc, needs_grad)
                # ignored tokens: zero their rows through the (c, D) operands, not the (c, V)
                # gradient (one full pass over the chunk less)
                keep = valid_all[start:end, None].to(compute_dtype)
            loss_sum += row_losses.sum()
            if needs_grad:
                grad_h = g @ w
                grad_hidden[start:end] = (grad_h if keep is None else grad_h * keep).to(hidden.dtype)
                _add_matmul_(grad_weight, g.t(), h if keep is None else h * keep)
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
        return gh, gw, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk_size: int = 4096, row_kernel: bool | None = None) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ weight.T`` against ``targets`` (-100 = ignore).

    hidden: (N, D); weight: (V, D); targets: (N,) int64. Matmuls run in the autocast dtype when
    autocast is on (bf16 on GPU), softmax and loss in fp32. ``row_kernel``: the loss and logits
    gradient of each chunk in one Triton kernel (``loss_kernel.py``); None = on CUDA when Triton
    imports. Both forms give the same loss and gradients up to rounding.
    """
    if row_kernel is None:
        row_kernel = hidden.is_cuda and triton_available() and hidden.dtype != torch.float64
    if torch.is_autocast_enabled(hidden.device.type):
        compute_dtype = torch.get_autocast_dtype(hidden.device.type)
    else:
        compute_dtype = torch.promote_types(hidden.dtype, weight.dtype)
    with torch.autocast(hidden.device.type, enabled=False):
        return _LinearCrossEntropy.apply(hidden, weight, targets, chunk_size, compute_dtype,
                                         row_kernel)
