"""The compiled Triton cross-entropy kernel on the GPU: the same loss and gradients as the torch
form of linear_cross_entropy under bf16 autocast, also replayed from a CUDA graph (the kernel
must need no host sync). The CPU suite checks the same kernel under Triton's interpreter."""

import torch

from mamba_train.models.loss import IGNORE_INDEX, linear_cross_entropy


def _inputs(n=6000, d=256, vocab=50280):
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(n, d, device="cuda", generator=g)
    w = torch.randn(vocab, d, device="cuda", generator=g) * 0.05
    t = torch.randint(0, vocab, (n,), device="cuda", generator=g)
    t[::11] = IGNORE_INDEX
    return h, w, t


def _loss_and_grads(h, w, t, row_kernel):
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = linear_cross_entropy(h, w, t, chunk_size=4096, row_kernel=row_kernel)
    loss.backward()
    return loss.detach(), h.grad, w.grad


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _full_logits_reference(h, w, t):
    """What a plain loop computes: bf16 logits of the whole batch, fp32 cross-entropy."""
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = h @ w.t()
    loss = torch.nn.functional.cross_entropy(logits.float(), t, ignore_index=IGNORE_INDEX)
    loss.backward()
    return loss.detach(), h.grad, w.grad


def test_row_kernel_matches_the_torch_form_and_full_logits_under_bf16_autocast(record):
    h, w, t = _inputs()
    lk, hk, wk = _loss_and_grads(h, w, t, row_kernel=True)
    lt, ht, wt = _loss_and_grads(h, w, t, row_kernel=False)
    lf, hf, wf = _full_logits_reference(h, w, t)
    record(f"loss kernel (6000 x 50280, bf16 logits): loss {lk.item():.6f} vs torch form "
           f"{lt.item():.6f} vs full logits {lf.item():.6f}; hidden grad rel err {_rel(hk, ht):.2e} "
           f"(full {_rel(hk, hf):.2e}), weight grad rel err {_rel(wk, wt):.2e} (full {_rel(wk, wf):.2e})")
    for loss in (lt, lf):
        assert abs(lk.item() - loss.item()) < 1e-4 * abs(loss.item())
    # each path rounds softmax - onehot to bf16 once before its matmuls
    for ref_h, ref_w in ((ht, wt), (hf, wf)):
        assert _rel(hk, ref_h) < 1e-2 and _rel(wk, ref_w) < 1e-2


def test_row_kernel_replays_in_a_cuda_graph():
    h, w, t = _inputs(n=4096)
    h, w = h.requires_grad_(), w.requires_grad_()
    static_t = t.clone()

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return linear_cross_entropy(h, w, static_t, row_kernel=True)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # compile and autotune outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step()
    new_t = torch.randint(0, w.shape[0], t.shape, device="cuda")
    static_t.copy_(new_t)
    graph.replay()
    expected = step()
    torch.cuda.synchronize()
    assert torch.isfinite(static_loss)
    assert abs(static_loss.item() - expected.item()) < 1e-5 * abs(expected.item())
