"""Long sequences end to end on CPU: the global batch stays fixed in tokens at any seq_len, the
chunked loss keeps nothing of size tokens x vocab, validation runs at its own length
(``data.val_seq_len``), and a window trains with packed-document boundaries."""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch

from conftest import TINY, compose_config
from mamba_train.data.datamodule import TokenDataModule
from mamba_train.data.shards import DataError
from mamba_train.models.loss import linear_cross_entropy
from mamba_train.train import train
from mamba_train.training.step.batch import BatchSizeError, grad_accumulation


@pytest.mark.parametrize("seq_len", [2048, 4096, 8192, 16384, 32768, 65536])
def test_global_batch_stays_fixed_in_tokens_at_any_seq_len(seq_len):
    micro_batch = max(1, 16384 // seq_len)
    for world in (1, 8):
        accum = grad_accumulation(524288, micro_batch, seq_len, world)
        assert accum * micro_batch * seq_len * world == 524288
    with pytest.raises(BatchSizeError, match="multiple"):
        grad_accumulation(524288, 3, seq_len, 1)


def _saved_numels(n_tokens: int, d: int = 16, vocab: int = 512) -> list[int]:
    sizes: list[int] = []
    hidden = torch.randn(n_tokens, d, requires_grad=True)
    weight = torch.randn(vocab, d, requires_grad=True)
    targets = torch.randint(0, vocab, (n_tokens,))

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = linear_cross_entropy(hidden, weight, targets, chunk_size=256)
    loss.backward()
    return sizes


def test_chunked_loss_keeps_nothing_of_size_tokens_by_vocab():
    """What the loss keeps for backward grows with tokens x d_model, never tokens x vocab."""
    d, vocab = 16, 512
    for n in (1024, 8192):
        sizes = _saved_numels(n, d, vocab)
        assert max(sizes) <= max(n * d, vocab * d) and sum(sizes) <= n * d + vocab * d + 1, sizes


def _datamodule(**kw) -> TokenDataModule:
    dm = TokenDataModule(num_workers=0, pin_memory=False, **kw)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_val_seq_len_validates_at_another_length():
    dm = _datamodule(seq_len=256, micro_batch_size=4, val_seq_len=2048)
    train_batch = next(iter(dm.train_dataloader()))
    val_batch = next(iter(dm.val_dataloader()))
    assert train_batch["input_ids"].shape == (4, 256)
    assert val_batch["input_ids"].shape == (1, 2048)  # 4 x 256 tokens per batch -> 1 window
    assert torch.equal(val_batch["labels"][0, :-1], val_batch["input_ids"][0, 1:])
    same = _datamodule(seq_len=256, micro_batch_size=4)
    assert same.val_seq_len == 256 and next(iter(same.val_dataloader()))["input_ids"].shape == (4, 256)
    with pytest.raises(DataError, match="val"):
        _datamodule(seq_len=256, micro_batch_size=4, val_seq_len=1_000_000)


class _Batches(L.Callback):
    def __init__(self):
        self.train, self.val = [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.train.append({k: v.clone() for k, v in batch.items()})

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.val.append(batch["input_ids"].shape)


def test_window_trains_with_boundaries_and_validates_at_another_length(tmp_path):
    seen = _Batches()
    cfg = compose_config([*TINY, "recipe=debug-mamba2", "trainer.accelerator=cpu",
                          "trainer.precision=32-true", "backend=reference", "logger=csv",
                          "data.seq_len=1024", "data.micro_batch_size=1", "data.val_seq_len=4096",
                          "train.global_batch_tokens=2048", "trainer.max_steps=2",
                          "train.val_every_n_steps=2", "trainer.limit_val_batches=1",
                          "data.document_boundaries=true", "data.mask_cross_document_loss=true",
                          "module.activation_checkpointing=all"], tmp_path)
    result = train(cfg, extra_callbacks=[seen])
    assert result["trainer"].accumulate_grad_batches == 2  # 2048 tokens = 2 x 1 x 1024
    assert result["trainer"].global_step == 2 and len(seen.train) == 4
    assert all(b["input_ids"].shape == (1, 1024) for b in seen.train)
    # packed documents inside the long windows: several per window, each with its own state
    assert max(int(b["seq_idx"].max()) for b in seen.train) >= 1
    assert seen.val == [torch.Size([1, 4096])]  # 4x the training length
    assert torch.isfinite(torch.tensor(result["metrics"]["val/loss"]))


def test_dense_document_mask_in_attention_warns_at_long_lengths(monkeypatch):
    from mamba_train.models import attention

    monkeypatch.setattr(attention, "DENSE_MASK_WARN_LEN", 16)
    layer = attention.CausalSelfAttention(32, num_heads=2, causal=True)
    x, idx = torch.randn(1, 32, 32), torch.zeros(1, 32, dtype=torch.int32)
    with pytest.warns(UserWarning, match="dense 32x32 mask"):
        layer(x, seq_idx=idx)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(x[:, :16], seq_idx=idx[:, :16])  # at or below the threshold: silent
