"""Shared by the captured-step GPU tests: one accumulated gradient computed eagerly twice (the
run-to-run noise of the kernels' atomics) and once through the captured step."""

from __future__ import annotations

import torch


def eager_and_captured_gradients(model, vocab_size: int, accumulate: int):
    """6 micro-batches of 4 x 1024 tokens through ``GraphedTrainStep``: eagerly (warm-up never
    ends), eagerly again, and captured after 2 warm-up micro-steps. Returns the three flat
    gradients and the replay counts of the first eager and the captured run."""
    from mamba_train.training.step.cuda_graph import GraphedTrainStep

    params = list(model.parameters())
    gen = torch.Generator(device="cuda").manual_seed(1)
    batches = []
    for _ in range(6):
        t = torch.randint(0, vocab_size, (4, 1025), device="cuda", generator=gen)
        batches.append({"input_ids": t[:, :-1].contiguous(), "labels": t[:, 1:].contiguous()})

    def loss_fn(b):
        return model(b["input_ids"], labels=b["labels"]).loss

    def accumulated(warmup: int) -> tuple[torch.Tensor, int]:
        step = GraphedTrainStep(loss_fn, params, accumulate=accumulate, mode="on", warmup=warmup)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            for i, b in enumerate(batches):
                if i % accumulate == 0:  # a new window (the training step zeroes after each step)
                    step.zero_grad()
                step.forward_backward(b)
        torch.cuda.synchronize()
        grads = torch.cat([p.grad.flatten() for p in params]).clone()
        replays = step.replays
        step.release()
        return grads, replays

    eager, eager_replays = accumulated(warmup=10**9)
    eager_again, _ = accumulated(warmup=10**9)
    captured, replays = accumulated(warmup=2)
    return eager, eager_again, captured, eager_replays, replays


def captured_vs_eager(model, vocab_size: int, accumulate: int, what: str) -> tuple[float, float]:
    """``eager_and_captured_gradients``, checked to have replayed the captured step (and never
    the eager one); returns |captured - eager| and the eager run-to-run |eager - eager|, both
    relative to |eager|."""
    eager, eager_again, captured, r0, replays = eager_and_captured_gradients(
        model, vocab_size, accumulate)
    assert r0 == 0 and replays == 4, f"the {what} step was not captured"
    assert torch.isfinite(captured).all()
    norm = eager.norm().item()
    return (captured - eager).norm().item() / norm, (eager_again - eager).norm().item() / norm
