"""A bias-free ``nn.Linear`` whose output comes out as separate contiguous tensors.

Why: Mamba-3's ``in_proj`` output is split along its last dimension into z, x, B, C and a few
per-head columns, and mamba_ssm's SISO kernel makes contiguous copies of its z and x slices (in
the forward and again in the backward), while autograd joins the slices' gradients back into one
(tokens, 3432) tensor with a ``cat``. On the captured mamba3-180m step those copies and that cat
were ~13 ms of the 122 ms GPU time (benchmarks/results/2026-12-02-mamba3-throughput.md). One GEMM
per group writes each group contiguously instead; the backward accumulates the input gradient in
the GEMMs' epilogue (``addmm_``) and writes each group's weight gradient straight into its rows, so
no ``cat`` and no copy remain. torch has no op for a GEMM with several outputs, hence this
function.

The weight is still one ``(sum(sizes), in_features)`` parameter named ``weight``: checkpoints,
init, optimizer groups and sharding (FSDP, ZeRO-3 gather on this module's forward) see an ordinary
``nn.Linear``. The maths is a regrouped ``F.linear``: each output element is the same dot product;
the input gradient sums its groups in a different order (bf16 rounding of partial sums).
"""

from __future__ import annotations

import torch
from torch import nn


class _SplitMatmul(torch.autograd.Function):
    """(..., k) @ weight.T, returned as one contiguous tensor per row group of ``weight``."""

    @staticmethod
    def forward(ctx, x, weight, sizes):
        x2 = x.reshape(-1, x.shape[-1])
        ctx.save_for_backward(x2, weight)
        ctx.sizes, ctx.x_shape = sizes, x.shape
        return tuple(torch.mm(x2, w.t()).view(*x.shape[:-1], w.shape[0])
                     for w in weight.split(sizes, 0))

    @staticmethod
    def backward(ctx, *grads):
        x2, weight = ctx.saved_tensors
        g2 = [None if g is None else g.reshape(-1, g.shape[-1]) for g in grads]
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            for g, w in zip(g2, weight.split(ctx.sizes, 0)):
                if g is not None:  # beta=1 accumulation in the GEMM: no separate add
                    grad_x = torch.mm(g, w) if grad_x is None else grad_x.addmm_(g, w)
            grad_x = x2.new_zeros(x2.shape) if grad_x is None else grad_x
            grad_x = grad_x.view(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            grad_w = torch.empty_like(weight)
            for g, rows in zip(g2, grad_w.split(ctx.sizes, 0)):
                if g is None:
                    rows.zero_()
                else:
                    torch.mm(g.t(), x2, out=rows)
        return grad_x, grad_w, None


class SplitOutputLinear(nn.Linear):
    """``nn.Linear(in_features, sum(sizes), bias=False)`` returning ``len(sizes)`` tensors,
    the same values as ``torch.split(linear(x), sizes, -1)`` but each contiguous. Under autocast
    input and weight are cast as ``F.linear`` would (the weight's gradient comes back fp32)."""

    def __init__(self, in_features: int, sizes: list[int], device=None, dtype=None):
        super().__init__(in_features, sum(sizes), bias=False, device=device, dtype=dtype)
        self.sizes = list(sizes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        weight = self.weight
        kind = x.device.type
        if torch.is_autocast_enabled(kind):
            dtype = torch.get_autocast_dtype(kind)
            x, weight = x.to(dtype), weight.to(dtype)
        with torch.autocast(kind, enabled=False):
            return _SplitMatmul.apply(x, weight, self.sizes)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, sizes={self.sizes}"
