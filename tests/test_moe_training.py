"""Training a mixture-of-experts model end to end on the CPU: the debug recipes train, the
balancing terms reach the loss, the correction bias moves after each optimizer step and the
per-layer expert load is logged (models/moe.py, training/run/callbacks/moe_balance.py)."""

from __future__ import annotations

import pytest
import torch

from conftest import metric_by_step
from mamba_train.models.moe import moe_layers

SMALL = ["data.seq_len=64", "data.micro_batch_size=4", "train.global_batch_tokens=256",
         "data.num_workers=0", "trainer.log_every_n_steps=2", "callbacks.progress_bar=null",
         "trainer.enable_model_summary=false", "logger=csv", "trainer.limit_val_batches=0",
         "trainer.accelerator=cpu", "trainer.precision=32-true", "trainer.max_steps=4"]


@pytest.mark.slow
@pytest.mark.parametrize("recipe,n_moe", [("debug-nemotron-moe", 4), ("debug-granite-moe", 4),
                                          ("debug-jamba", 2)])
def test_debug_moe_recipe_trains_balances_and_logs_expert_load(recipe, n_moe, make_config):
    from mamba_train.train import train

    cfg = make_config(f"recipe={recipe}", *SMALL, tiny=False)
    result = train(cfg)
    trainer = result["trainer"]
    assert trainer.global_step == 4
    layers = moe_layers(trainer.lightning_module.model)
    assert len(layers) == n_moe
    for _, m in layers:
        bias = m.router.e_score_correction_bias
        if m.cfg["bias_update_rate"]:
            # four updates of +-rate each: every entry a multiple of the rate, some nonzero
            steps = bias / m.cfg["bias_update_rate"]
            torch.testing.assert_close(steps, steps.round(), atol=1e-3, rtol=0)
            assert steps.abs().max() > 0 and steps.abs().max() <= 4
        else:
            assert bias is None
    first = int(layers[0][0].split("layers.")[1].split(".")[0])  # the block holding the first E
    imbalance = metric_by_step(result["run_dir"], f"moe/layer{first:02d}/imbalance")
    entropy = metric_by_step(result["run_dir"], f"moe/layer{first:02d}/router_entropy")
    assert sorted(imbalance) and all(v >= 1.0 for v in imbalance.values())
    n = layers[0][1].cfg["n_experts"]
    assert all(0 < v <= torch.log(torch.tensor(float(n))).item() + 1e-4 for v in entropy.values()), entropy


@pytest.mark.slow
def test_router_bias_updates_once_per_optimizer_step_under_accumulation(make_config, monkeypatch):
    """Two micro-batches per optimizer step: the correction bias moves once per step, not
    once per micro-batch (the callback follows training/step/train_step.py's step_ended)."""
    from mamba_train.train import train
    from mamba_train.training.run.callbacks import moe_balance

    calls = []
    real = moe_balance.update_router_bias
    monkeypatch.setattr(moe_balance, "update_router_bias",
                        lambda model: (calls.append(1), real(model))[1])
    cfg = make_config("recipe=debug-nemotron-moe", *SMALL[:-1], "train.global_batch_tokens=512",
                      "trainer.max_steps=3", tiny=False)
    result = train(cfg)
    assert result["trainer"].global_step == 3
    assert result["trainer"].accumulate_grad_batches == 2
    assert len(calls) == 3


@pytest.mark.slow
def test_resume_continues_a_moe_run_exactly(make_config, tmp_path):
    """A run resumed from step 3 repeats the uninterrupted run's losses and ends with the same
    correction biases: the bias moves outside the gradient, so it must travel in the checkpoint."""
    from mamba_train.train import train

    common = [*SMALL[:-1], "trainer.max_steps=6", "trainer.log_every_n_steps=1",
              "train.checkpoint_every_n_steps=3", "train.keep_last_k_checkpoints=-1"]
    whole = train(make_config("recipe=debug-nemotron-moe", *common, "run_name=whole", tiny=False))
    mid = whole["run_dir"] / "checkpoints" / "step0000003.ckpt"
    assert mid.is_file()
    resumed = train(make_config("recipe=debug-nemotron-moe", *common, "run_name=resumed",
                                f"ckpt_path={mid}", tiny=False))
    want = metric_by_step(whole["run_dir"], "train/global_loss")
    got = metric_by_step(resumed["run_dir"], "train/global_loss")
    assert sorted(got) == [4, 5, 6]
    assert all(got[s] == want[s] for s in got), (got, want)
    biases = [[m.router.e_score_correction_bias for _, m in moe_layers(r["module"].model)]
              for r in (whole, resumed)]
    for a, b in zip(*biases):
        assert torch.equal(a, b)
