"""Activation checkpointing on the fused kernels (bf16 autocast) and inside the captured step.

* Captured step (``module.cuda_graph=on``) with every block checkpointed: the step is really
  captured and replayed, and, under the deterministic mode (run in a process of its own: the
  kernels read the flag at import), its losses equal the captured run without checkpointing
  bit for bit.
* Mamba-1, Mamba-2, Mamba-3 and a hybrid with attention: the loss is identical with and without
  checkpointing (the recompute runs the same kernels on the same inputs), and every gradient
  differs by no more than two runs without checkpointing differ (the backward kernels'
  atomic adds)."""

from __future__ import annotations

import pytest
import torch

from conftest import compose_config, metric_by_step
from mamba_train.models.build import build_model
from mamba_train.models.config import MambaLMConfig
from mamba_train.train import train
from mamba_train.training.step.activation_checkpointing import apply_activation_checkpointing


def _run(tmp_path, policy: str):
    cfg = compose_config([
        "recipe=mamba2-130m", "model.n_layer=4", "data=default", "model.vocab_size=4096",
        "backend=fused", "data.seq_len=1024", "data.micro_batch_size=4",
        "train.global_batch_tokens=4096", "trainer.max_steps=8", "trainer.deterministic=true",
        "module.cuda_graph=on", "trainer.log_every_n_steps=1", "trainer.limit_val_batches=0",
        "train.val_every_n_steps=100000", "train.checkpoint_every_n_steps=100000", "logger=csv",
        f"module.activation_checkpointing={policy}", f"run_name=graph-{policy}"], tmp_path)
    result = train(cfg)
    return result, metric_by_step(result["run_dir"], "train/loss")


def test_captured_step_with_checkpointing_matches_bit_for_bit(tmp_path, record):
    ref, ref_losses = _run(tmp_path, "off")
    ac, losses = _run(tmp_path, "all")
    step = ac["module"].graph_step
    assert step is not None and step.replays > 0, ac["module"].training_step_mode
    record(f"activation_checkpointing mamba2 (4 layers, 4x1024) captured: "
           f"{ac['module'].training_step_mode}; losses equal: {losses == ref_losses}")
    assert sorted(losses) == list(range(1, 9)) and losses == ref_losses


MAMBA2 = {"layer": "Mamba2", "d_state": 64, "headdim": 32, "chunk_size": 64}
KINDS = {
    "mamba1": dict(ssm_cfg={"layer": "Mamba1"}),
    "mamba2": dict(ssm_cfg=MAMBA2),
    "mamba3": dict(ssm_cfg={"layer": "Mamba3"}),
    "hybrid": dict(ssm_cfg=MAMBA2, d_intermediate=512, attn_layer_idx=[1],
                   attn_cfg={"causal": True, "num_heads": 4, "rotary_emb_dim": 32}),
}


def _grads(kind: str, policy: str):
    torch.manual_seed(0)
    model = build_model(MambaLMConfig(d_model=256, n_layer=3, vocab_size=4096, **KINDS[kind]),
                        backend="fused", device="cuda")
    apply_activation_checkpointing(model, policy)
    tokens = torch.randint(0, 4096, (2, 1025), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(tokens[:, :-1], labels=tokens[:, 1:]).loss
    loss.backward()
    return loss.detach(), {n: p.grad.float() for n, p in model.named_parameters()}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_fused_kernels_give_the_same_loss_and_gradients(kind, record):
    loss, ref = _grads(kind, "off")
    loss2, again = _grads(kind, "off")
    loss_ac, ac = _grads(kind, "all")
    noise = max((again[n] - ref[n]).abs().max().item() for n in ref)
    diff = max((ac[n] - ref[n]).abs().max().item() for n in ref)
    record(f"activation_checkpointing {kind} fused bf16: loss equal {bool(loss_ac == loss)}, "
           f"max |grad diff| {diff:.3g} (run-to-run {noise:.3g})")
    assert torch.equal(loss, loss2) and torch.equal(loss_ac, loss)
    assert diff <= 2 * noise + 1e-7, (diff, noise)
