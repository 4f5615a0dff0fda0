"""Runs the Triton cross-entropy row kernel on CPU under Triton's interpreter and prints, as
JSON, how far it is from the torch form. ``TRITON_INTERPRET`` must be set before triton is
imported, hence a process of its own (tests/test_loss_kernel.py)."""

import json
import os

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from mamba_train.models.loss import IGNORE_INDEX, linear_cross_entropy  # noqa: E402
from mamba_train.models.loss_kernel import cross_entropy_rows_  # noqa: E402


def rows_case(dtype, n_rows, vocab, scale=3.0):
    """Kernel vs F.cross_entropy in fp32: row losses and the gradient written over the logits."""
    g = torch.Generator().manual_seed(vocab)
    x = (torch.randn(n_rows, vocab, generator=g) * scale).to(dtype)
    t = torch.randint(0, vocab, (n_rows,), generator=g)
    t[::3] = IGNORE_INDEX
    t[1] = vocab - 1  # the last column, in the last (partial) block
    ref = x.float().requires_grad_()
    ref_rows = F.cross_entropy(ref, t, ignore_index=IGNORE_INDEX, reduction="none")
    ref_rows.sum().backward()
    out = x.clone()
    rows = cross_entropy_rows_(out, t)
    return {"loss_err": (rows - ref_rows).abs().max().item(),
            "grad_err": (out.float() - ref.grad).abs().max().item(),
            "ignored_grad_max": out[::3].float().abs().max().item(),
            "loss_dtype": str(rows.dtype), "grad_dtype": str(out.dtype)}


def linear_case():
    """linear_cross_entropy with the kernel vs the torch form: loss and both gradients."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(50, 16, generator=g, requires_grad=True)
    w = torch.randn(300, 16, generator=g, requires_grad=True)
    t = torch.randint(0, 300, (50,), generator=g)
    t[::5] = IGNORE_INDEX
    results = []
    for row_kernel in (True, False):
        h.grad = w.grad = None
        loss = linear_cross_entropy(h, w, t, chunk_size=16, row_kernel=row_kernel)
        loss.backward()
        results.append((loss.detach(), h.grad.clone(), w.grad.clone()))
    (la, ha, wa), (lb, hb, wb) = results
    with torch.no_grad():
        nograd = linear_cross_entropy(h, w, t, chunk_size=16, row_kernel=True)
    return {"loss_err": (la - lb).abs().item(), "hidden_grad_err": (ha - hb).abs().max().item(),
            "weight_grad_err": (wa - wb).abs().max().item(), "nograd_loss_err": (nograd - lb).abs().item()}


print(json.dumps({
    "fp32_one_block": rows_case(torch.float32, 13, 1000),
    "fp32_three_blocks": rows_case(torch.float32, 7, 2 * 8192 + 77),
    "bf16": rows_case(torch.bfloat16, 13, 1000),
    "linear": linear_case(),
}))
