"""Cross-entropy of logit rows and its gradient in one Triton kernel (the GPU path of ``loss.py``).

In the torch form of ``linear_cross_entropy`` each chunk of (tokens x vocab) logits goes through
seven elementwise and reduction kernels in fp32: the upcast, the two reductions of logsumexp, the
gather, the subtraction, exp, and the downcast of the gradient. For mamba-370m at micro-batch 8
on an H100 that is 12 ms of a 253 ms step, against 8.7 ms for the plain loop's fp32 softmax
(``benchmarks/profile_step.py``, benchmarks/results/2026-11-23-captured-step-throughput.md). Here
one program per row reads the bf16 row twice: an online max / sum-of-exp in fp32, then ``softmax -
onehot``, which it writes over the logits in their own dtype. The row's loss is stored in fp32.

Written by hand: Liger-Kernel's cross-entropy kernel does the same arithmetic, but its Python
entry point counts the non-ignored tokens and checks the targets with ``.item()``. Those are host
syncs, which cannot run inside a captured CUDA graph (``module.cuda_graph``), and it keeps the
per-row losses in the input dtype (bf16).

On CPU the kernel runs under Triton's interpreter (``TRITON_INTERPRET=1``, set before import),
which is how the tests check it against the torch form.
"""

from __future__ import annotations

import functools

import torch

IGNORE_INDEX = -100


@functools.lru_cache(maxsize=None)
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def cross_entropy_rows_kernel(logits_ptr, row_stride, targets_ptr, loss_ptr, ignore_index,
                                  n_cols: tl.constexpr, BLOCK: tl.constexpr):
        # n_cols (the vocabulary) is a compile-time constant: one compilation per model
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * row_stride
        target = tl.load(targets_ptr + row)
        # pass 1: log-sum-exp with a running max, in fp32
        running_max = float("-inf")
        running_sum = 0.0
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(base + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
            new_max = tl.maximum(running_max, tl.max(x, axis=0))
            running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(x - new_max), axis=0)
            running_max = new_max
        lse = running_max + tl.log(running_sum)
        valid = target != ignore_index
        safe_target = tl.where(valid, target, 0)
        target_logit = tl.load(base + safe_target).to(tl.float32)
        tl.store(loss_ptr + row, tl.where(valid, lse - target_logit, 0.0))
        # pass 2: d(loss)/d(logits) = softmax - onehot (zero for an ignored row), over the logits
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(base + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
            grad = tl.exp(x - lse) - tl.where(cols == safe_target, 1.0, 0.0)
            grad = tl.where(valid, grad, 0.0)
            tl.store(base + cols, grad.to(logits_ptr.dtype.element_ty), mask=cols < n_cols)

    return cross_entropy_rows_kernel


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def cross_entropy_rows_(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-row fp32 cross-entropy of ``logits`` (N, V) against ``targets`` (N,), -100 = ignore.

    Overwrites ``logits`` with d(sum of the row losses)/d(logits): ``softmax - onehot``, zero
    on ignored rows. No host sync, so it can be captured in a CUDA graph.
    """
    import triton

    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(f"logits must be a row-contiguous (N, V) matrix, got {tuple(logits.shape)} "
                         f"with strides {logits.stride()}")
    n_rows, n_cols = logits.shape
    losses = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    if n_rows == 0:
        return losses
    block = min(8192, triton.next_power_of_2(n_cols))
    _kernel()[(n_rows,)](logits, logits.stride(0), targets.contiguous(), losses, IGNORE_INDEX,
                         n_cols=n_cols, BLOCK=block, num_warps=16)
    return losses
