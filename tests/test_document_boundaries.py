"""Packed documents with seq_idx behave as separate documents, through the whole LM."""

import pytest
import torch

from mamba_train import MambaLMConfig, build_model
from mamba_train.data.boundaries import add_document_boundaries, document_ids
from mamba_train.models.loss import IGNORE_INDEX

EOS = 0
MODELS = {
    "mamba1": dict(d_model=32, n_layer=2, vocab_size=64, ssm_cfg={"layer": "Mamba1", "d_state": 8}),
    "mamba2": dict(d_model=32, n_layer=2, vocab_size=64,
                   ssm_cfg={"layer": "Mamba2", "d_state": 8, "headdim": 16, "chunk_size": 16}),
    "hybrid": dict(d_model=32, n_layer=3, d_intermediate=64, vocab_size=64, attn_layer_idx=[1],
                   attn_cfg={"causal": True, "num_heads": 2, "rotary_emb_dim": 8},
                   ssm_cfg={"layer": "Mamba2", "d_state": 8, "headdim": 16, "chunk_size": 16}),
}


def test_document_ids_from_eos():
    x = torch.tensor([[5, 6, EOS, 7, EOS, EOS, 8, 9], [EOS, 1, 2, 3, 4, 5, 6, EOS]])
    assert document_ids(x, EOS).tolist() == [[0, 0, 0, 1, 1, 2, 3, 3], [0, 1, 1, 1, 1, 1, 1, 1]]
    assert document_ids(x, EOS).dtype == torch.int32


def test_loss_mask_on_the_token_after_eos():
    x = torch.tensor([[5, EOS, 7, 8]])
    batch = add_document_boundaries({"input_ids": x, "labels": torch.tensor([[1, 7, 8, 9]])},
                                    EOS, mask_cross_document_loss=True)
    assert batch["labels"].tolist() == [[1, IGNORE_INDEX, 8, 9]]
    assert batch["seq_idx"].tolist() == [[0, 0, 1, 1]]


@pytest.mark.parametrize("name", list(MODELS))
def test_packed_window_equals_separate_documents(name):
    """Documents of 1, 2, 3 and 200+ tokens (boundary right after position 0 and a one-token
    document at the last position): logits and parameter gradients of the packed window equal
    those of each document run alone."""
    torch.manual_seed(0)
    model = build_model(MambaLMConfig(**MODELS[name]), backend="reference").double()
    lengths = [1, 2, 3, 210, 1]
    docs = [torch.randint(1, 64, (n,)) for n in lengths]
    for d in docs[:-1]:
        d[-1] = EOS
    packed = torch.cat(docs)[None]
    seq_idx = document_ids(packed, EOS)
    assert seq_idx[0, -1] == len(lengths) - 1 and seq_idx[0, 0] == 0
    weights = torch.randn(1, packed.shape[1], 64, dtype=torch.float64)  # any scalar of the logits

    model.zero_grad()
    out = model(packed, seq_idx=seq_idx).logits[..., :64]
    (out * weights).sum().backward()
    grads_packed = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad()
    parts, start = [], 0
    for d in docs:
        o = model(d[None]).logits[..., :64]
        (o * weights[:, start:start + len(d)]).sum().backward()
        parts.append(o.detach())
        start += len(d)
    assert torch.allclose(out.detach(), torch.cat(parts, dim=1), atol=1e-10)
    # rtol 1e-6: like mamba_ssm, the mixers compute A = -exp(A_log.float()) even in fp64, so the
    # A_log / Δ gradients pass through an fp32 cast (~1e-7 relative); a leak would be O(1).
    for n, p in model.named_parameters():
        assert torch.allclose(grads_packed[n], p.grad, rtol=1e-6, atol=1e-9), n

    # control: without seq_idx the documents leak into each other
    leaky = model(packed).logits[..., :64]
    assert not torch.allclose(leaky, out, atol=1e-6)


class _BatchSpy:
    """Records what the training step receives (after the DataModule's device-side hook)."""

    def __init__(self):
        self.batches = []

    def __call__(self):
        import lightning as L
        spy = self

        class Spy(L.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                spy.batches.append({k: v.clone() for k, v in batch.items()})
        return Spy()


def _short_documents(root, vocab=4096, n=20_000):
    """Shards of random tokens with an EOS every 5-40 tokens."""
    import numpy as np
    from mamba_train.data.shards import write_tokens
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, vocab, n, dtype=np.uint16)
    tokens[np.cumsum(rng.integers(5, 40, n // 5))[: n // 40]] = EOS
    info = {"name": "synthetic", "vocab_size": vocab, "eos_id": EOS}
    write_tokens(root / "train", tokens, info)
    write_tokens(root / "val", tokens[:2000], info, split="val")
    return root


def test_training_passes_seq_idx_and_masks_the_loss(make_config, tmp_path):
    from mamba_train.train import train
    spy = _BatchSpy()
    data = _short_documents(tmp_path / "docs")
    cfg = make_config(f"data.path={data}", "data.tokenizer=null","recipe=debug-hybrid", "model.n_layer=3", "model.attn_cfg.rotary_emb_dim=8",
                      "data.document_boundaries=true",
                      "data.mask_cross_document_loss=true", "trainer.max_steps=2",
                      "trainer.limit_val_batches=1", "train.val_every_n_steps=2")
    result = train(cfg, extra_callbacks=[spy()])
    assert result["trainer"].global_step == 2
    eos = result["datamodule"].eos_id
    for batch in spy.batches:
        assert torch.equal(batch["seq_idx"], document_ids(batch["input_ids"], eos))
        assert (batch["labels"][batch["input_ids"] == eos] == IGNORE_INDEX).all()
    assert any((b["input_ids"] == eos).any() for b in spy.batches)  # boundaries were exercised


def test_mask_without_boundaries_is_refused(make_config):
    from hydra.utils import instantiate
    cfg = make_config("data.mask_cross_document_loss=true")
    with pytest.raises(Exception, match="document_boundaries=true"):  # via Hydra's wrapper
        instantiate(cfg.data)


@pytest.fixture
def restore_determinism(monkeypatch):
    monkeypatch.setenv("MAMBA_DETERMINISTIC", "0")
    yield
    torch.use_deterministic_algorithms(False)


def test_deterministic_mode_configures_the_kernels(make_config, restore_determinism):
    import os
    from mamba_train.train import train
    train(make_config("recipe=debug-mamba2", "trainer.deterministic=true", "trainer.max_steps=1",
                      "trainer.limit_val_batches=1"))
    assert os.environ["MAMBA_DETERMINISTIC"] == "1"
    assert torch.are_deterministic_algorithms_enabled()
