"""Activation checkpointing (``module.activation_checkpointing``) changes memory, not numbers:
losses and every gradient are bit-identical with and without it (fp32, reference backend) for
Mamba-1, Mamba-2, Mamba-3, a hybrid with attention and a layer pattern, with packed documents, on one process, through the
real training task, and under 2-process DDP."""

from __future__ import annotations

import pytest
import torch

from conftest import TINY, compose_config, metric_by_step
from mamba_train.models.build import build_model
from mamba_train.models.config import MambaLMConfig
from mamba_train.train import train
from mamba_train.training.step.activation_checkpointing import (ActivationCheckpointingError,
                                                          apply_activation_checkpointing,
                                                          checkpointed_block_indices, describe,
                                                          normalize_policy)

MAMBA2 = {"layer": "Mamba2", "d_state": 16, "headdim": 16, "chunk_size": 16}
CONFIGS = {
    "mamba1": dict(d_model=32, n_layer=3, vocab_size=96, ssm_cfg={"layer": "Mamba1", "d_state": 8}),
    "mamba2": dict(d_model=32, n_layer=3, vocab_size=96, ssm_cfg=MAMBA2),
    "mamba3": dict(d_model=32, n_layer=3, vocab_size=96,
                   ssm_cfg={"layer": "Mamba3", "d_state": 16, "headdim": 16, "chunk_size": 16}),
    "hybrid": dict(d_model=32, n_layer=3, vocab_size=96, d_intermediate=64, ssm_cfg=MAMBA2,
                   attn_layer_idx=[1], attn_cfg={"causal": True, "num_heads": 2, "rotary_emb_dim": 8,
                                                 "qkv_proj_bias": False, "out_proj_bias": False}),
    # a layer pattern: parallel SSM+attention, an SSM block and an MLP-only block, multipliers
    "pattern": dict(d_model=32, n_layer=3, vocab_size=96, d_intermediate=64, ssm_cfg=MAMBA2,
                    layer_pattern="P-M--", attn_cfg={"causal": True, "num_heads": 2,
                                                     "rotary_emb_dim": 8},
                    mlp_cfg={"act": "relu2"}, multipliers={"ssm_out": 0.5, "embedding": 2.0}),
}


def _loss_and_grads(kind: str, policy: str, k: int = 2, seq_idx: bool = False):
    torch.manual_seed(0)
    model = build_model(MambaLMConfig(**CONFIGS[kind]), backend="reference")
    marked = apply_activation_checkpointing(model, policy, k)
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 96, (2, 41), generator=gen)
    idx = None
    if seq_idx:  # two packed documents per row, boundary at different places
        idx = torch.zeros(2, 40, dtype=torch.int32)
        idx[0, 13:], idx[1, 29:] = 1, 1
    loss = model(tokens[:, :-1], seq_idx=idx, labels=tokens[:, 1:], loss_chunk_size=32).loss
    loss.backward()
    return marked, loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("kind", sorted(CONFIGS))
@pytest.mark.parametrize("policy,k", [("all", 2), ("every_k", 2)])
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
def test_loss_and_gradients_are_bit_identical(kind, policy, k, packed):
    if packed and kind == "mamba1":
        pytest.skip("Mamba-1 has no seq_idx path (state-spaces/mamba#180); covered densely")
    none, ref_loss, ref_grads = _loss_and_grads(kind, "off", seq_idx=packed)
    marked, loss, grads = _loss_and_grads(kind, policy, k, seq_idx=packed)
    assert none == [] and marked == ([0, 1, 2] if policy == "all" else [0, 2])
    assert torch.equal(loss, ref_loss)
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        assert torch.equal(g, ref_grads[name]), name


def test_checkpointed_block_really_recomputes():
    """The mark is not a no-op: a checkpointed block runs its forward again in the backward."""
    model = build_model(MambaLMConfig(**CONFIGS["mamba2"]), backend="reference")
    calls = []
    for block in model.backbone.layers:
        # a pre-hook: the recompute stops early once it has rebuilt what the backward needs
        block.mixer.register_forward_pre_hook(lambda m, i: calls.append(m.layer_idx))
    tokens = torch.randint(0, 96, (1, 17))
    apply_activation_checkpointing(model, "every_k", k=2)
    model(tokens[:, :-1], labels=tokens[:, 1:]).loss.backward()
    assert sorted(calls) == [0, 0, 1, 2, 2]
    calls.clear()
    with torch.no_grad():  # evaluation: nothing to recompute
        model(tokens[:, :-1], labels=tokens[:, 1:])
    assert sorted(calls) == [0, 1, 2]


def test_marks_keep_names_and_state_dict_and_can_be_undone():
    model = build_model(MambaLMConfig(**CONFIGS["hybrid"]), backend="reference")
    keys = list(model.state_dict())
    apply_activation_checkpointing(model, "all")
    assert list(model.state_dict()) == keys
    assert describe(model) == "activation checkpointing: 3 of 3 blocks"
    assert apply_activation_checkpointing(model, False) == []  # YAML's bare `off`
    assert describe(model) == "activation checkpointing: off"


def test_policies_and_bad_input():
    assert checkpointed_block_indices(7, "every_k", 3) == [0, 3, 6]
    assert checkpointed_block_indices(4, "every_k", 1) == [0, 1, 2, 3]
    assert checkpointed_block_indices(4, True) == [0, 1, 2, 3]
    assert normalize_policy("OFF") == "off"
    with pytest.raises(ActivationCheckpointingError, match="expected one of"):
        normalize_policy("some")
    with pytest.raises(ActivationCheckpointingError, match="positive integer"):
        checkpointed_block_indices(4, "every_k", 0)
    model = build_model(MambaLMConfig(**CONFIGS["mamba2"]), backend="reference")
    model.backbone.layers[0].mixer.drop = torch.nn.Dropout(0.1)
    with pytest.raises(ActivationCheckpointingError, match="dropout"):
        apply_activation_checkpointing(model, "all")


RUN = [*TINY, "recipe=debug-hybrid", "model.n_layer=4", "model.attn_cfg.rotary_emb_dim=16", "trainer.max_steps=3", "trainer.limit_val_batches=0",
       "train.val_every_n_steps=1000", "logger=csv", "trainer.accelerator=cpu",
       "trainer.precision=32-true", "backend=reference"]


def _train(tmp_path, name, *overrides):
    result = train(compose_config([*RUN, f"run_name={name}", *overrides], tmp_path))
    state = {k: v.clone() for k, v in result["module"].model.state_dict().items()}
    return metric_by_step(result["run_dir"], "train/loss"), state, result["module"]


def test_training_task_is_identical_with_checkpointing(tmp_path):
    """Through the composed config and the real module: same losses, same weights after 3 steps."""
    ref_losses, ref_state, _ = _train(tmp_path, "off")
    losses, state, module = _train(tmp_path, "every2", "module.activation_checkpointing=every_k",
                                   "module.activation_checkpointing_k=2")
    assert [b.checkpoint_activations for b in module.model.backbone.layers] == [True, False, True, False]
    assert losses == ref_losses and len(losses) == 3
    for k, v in state.items():
        assert torch.equal(v, ref_state[k]), k


def test_bad_policy_fails_before_training(tmp_path):
    with pytest.raises(ActivationCheckpointingError, match="module.activation_checkpointing"):
        train(compose_config([*RUN, "module.activation_checkpointing=sometimes"], tmp_path))


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp"])
def test_two_process_run_is_identical_with_checkpointing(tmp_path, strategy):
    """2 CPU processes (gloo): the loss trajectory with every block checkpointed equals the one
    without, step for step (same process layout, so the float summation order is the same).
    FSDP and ZeRO-3 with checkpointing are compared with one process in test_distributed.py."""
    from test_distributed import global_losses, run_cli

    common = ["trainer.devices=2", f"strategy={strategy}", "backend=reference"]
    run_cli(tmp_path, *common, "run_name=off")
    run_cli(tmp_path, *common, "run_name=all", "module.activation_checkpointing=all")
    ref, losses = global_losses(tmp_path / "off"), global_losses(tmp_path / "all")
    assert len(ref) >= 3 and losses == ref


class _ReadsSavedTensorsTwice(torch.autograd.Function):
    """y = x * w, with a backward that reads ``ctx.saved_tensors`` twice, as mamba_ssm 2.3.2's
    Mamba-3 scan does (a ``len`` check, then the unpacking)."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.scale = 1.0
        ctx.save_for_backward(x, w)
        return x * w

    @staticmethod
    def backward(ctx, grad):
        assert len(ctx.saved_tensors) == 2
        x, w = ctx.saved_tensors
        return grad * w * ctx.scale, (grad * x).sum(0) * ctx.scale


def test_saved_tensors_read_once_lets_a_double_reading_backward_be_checkpointed():
    from torch.utils.checkpoint import CheckpointError, checkpoint

    from mamba_train.models.checkpoint_compat import saved_tensors_read_once

    x = torch.randn(5, 3, requires_grad=True)
    w = torch.randn(3, requires_grad=True)

    def grads(function, checkpointed):
        x.grad = w.grad = None
        run = (lambda a, b: function.apply(a, b).sin())
        out = checkpoint(run, x, w, use_reentrant=False) if checkpointed else run(x, w)
        out.sum().backward()
        return x.grad.clone(), w.grad.clone()

    with pytest.raises(CheckpointError, match="already unpacked once"):
        grads(_ReadsSavedTensorsTwice, checkpointed=True)
    read_once = saved_tensors_read_once(_ReadsSavedTensorsTwice)
    assert read_once.__name__ == "_ReadsSavedTensorsTwiceReadOnce"
    expected = grads(_ReadsSavedTensorsTwice, checkpointed=False)
    for got in (grads(read_once, checkpointed=True), grads(read_once, checkpointed=False)):
        assert all(torch.equal(a, b) for a, b in zip(got, expected))
