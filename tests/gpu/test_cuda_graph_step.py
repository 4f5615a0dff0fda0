"""The captured training step (``module.cuda_graph=on``) computes what the eager one does.

* Mamba-2, whole training runs: 24 optimizer steps with accumulation 2 and validation inside,
  under the deterministic mode (MAMBA_DETERMINISTIC), captured vs eager, bit for bit. Run this
  file in a process of its own (tests/gpu/run_all.sh does): the kernels read the flag when they
  are imported.
* Mamba and Mamba-2, one accumulated gradient (2 eager warm-up micro-steps, 4 replayed). Mamba-1's
  CUDA scan and causal-conv1d backward accumulate with atomics even in deterministic mode, and a
  training trajectory amplifies that at every loss spike (two eager 24-step runs differed by 0.26
  in loss, benchmarks/results/2026-11-23-captured-step-throughput.md), so for it the bound is
  measured on one gradient: a second eager accumulation gives the kernels' own difference."""

from pathlib import Path

import pytest
import torch

from conftest import compose_config, metric_by_step
from gpu.graph_step import captured_vs_eager
from mamba_train.train import train

STEPS = 24


def _config(out: Path, recipe: str, mode: str, suffix: str = "", accumulate: int = 2):
    overrides = [
        f"recipe={recipe}", "model.n_layer=4", "data=default", "model.vocab_size=4096",
        "backend=fused", "data.seq_len=1024", "data.micro_batch_size=4",
        f"train.global_batch_tokens={4096 * accumulate}",
        f"trainer.max_steps={STEPS}", "trainer.deterministic=true", f"module.cuda_graph={mode}",
        "trainer.log_every_n_steps=1", "trainer.limit_val_batches=2", "train.val_every_n_steps=8",
        "train.checkpoint_every_n_steps=100000", "logger=csv", f"run_name={recipe}-{mode}{suffix}",
    ]
    return compose_config(overrides, out)


def _losses(run_dir: Path) -> dict[int, float]:
    return metric_by_step(run_dir, "train/global_loss")


@pytest.mark.parametrize("accumulate", [2, 1], ids=["flat-grad-buffer", "graph-owned-grads"])
def test_captured_training_matches_eager_bit_for_bit_mamba2(tmp_path, record, accumulate):
    recipe = "mamba2-130m"
    eager = train(_config(tmp_path, recipe, "off", accumulate=accumulate))
    eager_again = train(_config(tmp_path, recipe, "off", "-again", accumulate=accumulate))
    graphed = train(_config(tmp_path, recipe, "on", accumulate=accumulate))
    assert graphed["module"].graph_step.replays > 0, "the step was not captured"
    assert graphed["module"].graph_step.graph_owns_grads == (accumulate == 1)
    a, a2, b = (_losses(r["run_dir"]) for r in (eager, eager_again, graphed))
    assert sorted(a) == sorted(a2) == sorted(b) == list(range(1, STEPS + 1))
    noise = max(abs(a[s] - a2[s]) for s in a)
    diff = max(abs(a[s] - b[s]) for s in a)
    wdiff = _max_weight_diff(eager, graphed)
    record(f"cuda_graph {recipe} (4 layers, 4x1024, accumulation {accumulate}, deterministic): {STEPS} steps, "
           f"max |loss eager - captured| {diff:.3g} (eager - eager {noise:.3g}), max |weight "
           f"diff| {wdiff:.3g}, final loss eager {a[STEPS - 1]!r} captured {b[STEPS - 1]!r}")
    assert noise == 0.0, "Mamba-2 kernels should be deterministic under MAMBA_DETERMINISTIC"
    assert diff == 0.0 and wdiff == 0.0


@pytest.mark.parametrize("accumulate", [6, 1], ids=["flat-grad-buffer", "graph-owned-grads"])
@pytest.mark.parametrize("recipe", ["mamba-130m", "mamba2-130m"])
def test_captured_gradients_match_eager(recipe, accumulate, record):
    """6 micro-batches (2 eager warm-up, 4 replayed) as one accumulated optimizer step, or as 6
    steps of one micro-batch (the graph owns the gradients; the last one is compared), against
    eager. Mamba-1's backward uses atomics, so the bound is measured: a second eager run gives
    the kernels' own difference."""
    from hydra.utils import instantiate

    from mamba_train.models.build import build_model

    model_cfg = instantiate(_config(Path("unused"), recipe, "off").model, _convert_="all")
    torch.manual_seed(0)
    model = build_model(model_cfg, backend="fused", device="cuda")
    diff, noise = captured_vs_eager(model, model_cfg.vocab_size, accumulate, recipe)
    record(f"cuda_graph gradients {recipe} (4 layers, 6 x 4x1024, accumulation {accumulate}, bf16): "
           f"relative |captured - eager| {diff:.3g}, |eager - eager| {noise:.3g}")
    if noise == 0.0:
        assert diff == 0.0
    else:
        assert diff <= 4 * noise + 1e-6, (diff, noise)


def _max_weight_diff(x: dict, y: dict) -> float:
    px, py = x["module"].model.state_dict(), y["module"].model.state_dict()
    return max((px[k].float() - py[k].float()).abs().max().item() for k in px)


def test_graph_owned_gradients_survive_a_grad_reset_and_an_odd_shaped_batch():
    """Accumulation 1: the captured backward owns the gradient tensors. A ``.grad = None`` from
    elsewhere is re-bound after the next replay, and an eager micro-step (a batch of another
    shape) starts from zero in those same tensors, not from the last replay's values."""
    from mamba_train.training.step.cuda_graph import GraphedTrainStep

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1)).cuda()
    params = list(model.parameters())

    def loss_fn(b):
        return model(b["x"]).square().mean()

    def eager_grads(b):
        model.zero_grad(set_to_none=True)
        loss_fn(b).backward()
        return [p.grad.clone() for p in params]

    step = GraphedTrainStep(loss_fn, params, accumulate=1, mode="on", warmup=2)
    batches = [{"x": torch.randn(8, 16, device="cuda")} for _ in range(6)]
    for b in batches[:4]:
        step.zero_grad()  # every micro-batch is a window at accumulation 1
        step.forward_backward(b)
    assert step.captured and step.graph_owns_grads and step.replays == 2
    owned = [p.grad for p in params]
    params[0].grad = None  # e.g. somebody's zero_grad(set_to_none=True)
    step.zero_grad()
    step.forward_backward(batches[4])
    assert all(p.grad is g for p, g in zip(params, owned))
    expected = eager_grads(batches[4])
    for p, g in zip(params, owned):
        p.grad = g
    assert all(torch.allclose(g, e) for g, e in zip(owned, expected))
    odd = {"x": torch.randn(5, 16, device="cuda")}  # another shape: runs eagerly
    step.zero_grad()
    step.forward_backward(odd)
    expected = eager_grads(odd)
    for p, g in zip(params, owned):
        p.grad = g
    assert all(torch.allclose(g, e) for g, e in zip(owned, expected))
    step.release()
