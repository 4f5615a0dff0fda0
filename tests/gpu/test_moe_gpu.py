"""Mixture-of-experts on the GPU (models/moe.py): the grouped-GEMM path against the per-expert
reference loop (logits and gradients, bf16 autocast), and the captured training step of a MoE
model against the eager one (the grouped path has no host sync, so the step captures)."""

from pathlib import Path

import pytest
import torch

from conftest import compose_config
from gpu.graph_step import captured_vs_eager

RECIPES = ["debug-nemotron-moe", "debug-granite-moe"]


def _model(recipe: str, impl: str):
    from hydra.utils import instantiate

    from mamba_train.models.build import build_model

    cfg = instantiate(compose_config([f"recipe={recipe}"], Path("unused")).model, _convert_="all")
    cfg.moe_cfg["impl"] = impl
    torch.manual_seed(0)
    return build_model(cfg, backend="fused", device="cuda"), cfg


@pytest.mark.parametrize("recipe", RECIPES)
def test_grouped_experts_equal_the_reference_loop(recipe, record):
    ids = torch.randint(0, 4096, (4, 512), device="cuda",
                        generator=torch.Generator(device="cuda").manual_seed(0))
    out = {}
    for impl in ("loop", "grouped"):
        model, _ = _model(recipe, impl)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(ids).logits.float()
            loss = model(ids, labels=ids).loss
        loss.backward()
        out[impl] = (logits, torch.cat([p.grad.flatten() for p in model.parameters()]))
    (l0, g0), (l1, g1) = out["loop"], out["grouped"]
    dl = ((l1 - l0).norm() / l0.norm()).item()
    dg = ((g1 - g0).norm() / g0.norm()).item()
    record(f"moe {recipe} grouped vs loop (bf16, 4x512): relative logits {dl:.3g}, grads {dg:.3g}")
    assert dl < 1e-2 and dg < 3e-2


@pytest.mark.parametrize("recipe", RECIPES)
def test_captured_step_captures_a_moe_model_and_equals_eager(recipe, record):
    model, cfg = _model(recipe, "auto")
    diff, noise = captured_vs_eager(model, cfg.vocab_size, 6, "MoE")
    record(f"cuda_graph gradients {recipe} (6 x 4x1024, bf16): relative |captured - eager| "
           f"{diff:.3g}, |eager - eager| {noise:.3g}")
    assert diff <= 4 * noise + 1e-6, (diff, noise)  # index_add's atomics: bounded by eager noise
