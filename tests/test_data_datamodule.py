"""TokenDataModule: setup-time validation, the default corpus, and exact resume through a real
Lightning checkpoint (the loader state Lightning itself saves and restores)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

from mamba_train.data.datamodule import TokenDataModule, default_data_dir
from mamba_train.data.shards import DataError, write_tokens

TOK = {"name": "default", "vocab_size": 4096, "eos_id": 0}


def make_prepared(root, train_windows=10, val_windows=4, seq_len=4, offset=0):
    """A prepare-like out dir; window w of train starts with token offset + w * seq_len."""
    write_tokens(root / "train", offset + np.arange(train_windows * seq_len + 1), TOK, tokens_per_shard=13)
    write_tokens(root / "val", np.arange(val_windows * seq_len + 1), TOK, tokens_per_shard=13)
    return root


def test_default_corpus(tmp_path):
    dm = TokenDataModule(seq_len=256, micro_batch_size=4, num_workers=0, cache_dir=str(tmp_path),
                         epoch_batches=64)
    dm.prepare_data()
    dm.setup("fit")
    assert default_data_dir("default", tmp_path).is_dir()
    assert dm.vocab_size == 4096 and dm.eos_id == 0
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (4, 256) and int(batch["input_ids"].max()) < 4096
    assert len(dm.train_dataloader()) == 64
    assert len(dm.val_dataloader()) >= 10
    assert dm.train_dataloader() is dm.train_dataloader()  # one loader: its position survives reloads


def test_hydra_instantiate(tmp_path):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    make_prepared(tmp_path / "a")
    make_prepared(tmp_path / "b", offset=1000)
    cfg = OmegaConf.create({"_target_": "mamba_train.data.datamodule.TokenDataModule",
                            "sources": [{"path": str(tmp_path / "a"), "weight": 3},
                                        {"path": str(tmp_path / "b"), "weight": 1}],
                            "seq_len": 4, "micro_batch_size": 2, "num_workers": 0,
                            "expected_vocab_size": 4096})
    dm = instantiate(cfg)
    dm.setup("fit")
    firsts = [int(x) for b in dm.train_dataloader() for x in b["input_ids"][:, 0]]
    assert sum(t >= 1000 for t in firsts) == len(firsts) // 4
    assert len(dm.val_dataloader().dataset) == 8  # both sources' val


@pytest.mark.parametrize("case,kwargs,message", [
    ("missing", {}, "does not exist"),
    ("vocab", {"expected_vocab_size": 50277}, r"vocab_size=4096\).*vocab_size=50277"),
    ("tokenizer", {"tokenizer": "__other__"}, r"tokenized with 'default'.*\(vocab_size=4096"),
    ("short", {"seq_len": 64}, "fewer than the 65 needed"),
    ("split", {}, "is a single split, not a prepare output"),
])
def test_setup_rejects_bad_data(tmp_path, case, kwargs, message):
    root = make_prepared(tmp_path / "data")
    path = {"missing": tmp_path / "nope", "split": root / "train"}.get(case, root)
    if case == "tokenizer":  # a second tokenizer with another vocabulary
        from tokenizers import Tokenizer, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel()
        tok.train_from_iterator(["hello world"] * 10, trainers.BpeTrainer(
            vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False))
        tok.save(str(tmp_path / "other.json"))
        kwargs = {"tokenizer": str(tmp_path / "other.json")}
    dm = TokenDataModule(path=str(path), **{"seq_len": 4, "num_workers": 0, **kwargs})
    with pytest.raises(DataError, match=message):
        dm.setup("fit")


class Recorder(L.LightningModule):
    """Records the first token of every sample it trains on."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[int] = []

    def training_step(self, batch, batch_idx):
        self.seen += batch["input_ids"][:, 0].tolist()
        return (self.w - 1).pow(2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(root, ckpt_dir, num_workers, ckpt_path=None, max_steps=12):
    dm = TokenDataModule(path=str(root), seq_len=4, micro_batch_size=2, num_workers=num_workers)
    model = Recorder()
    trainer = L.Trainer(
        max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        callbacks=[ModelCheckpoint(dirpath=ckpt_dir, filename="{step}", every_n_train_steps=1,
                                   save_top_k=-1)])
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return model.seen


def test_lightning_checkpoint_resume_is_exact(tmp_path):
    """12 steps over 5-batch epochs; resuming from mid-epoch (step 3, 7) and epoch-end (step 5)
    checkpoints, with another num_workers, replays exactly the rest of the uninterrupted run."""
    root = make_prepared(tmp_path / "data", train_windows=10)
    full = _fit(root, tmp_path / "ckpt", num_workers=0)
    assert len(full) == 24 and sorted(full[:10]) == sorted(full[10:20]) and full[:10] != full[10:20]
    for step, workers in [(3, 2), (5, 1), (7, 0)]:
        resumed = _fit(root, tmp_path / f"ckpt{step}", workers, tmp_path / "ckpt" / f"step={step}.ckpt")
        assert resumed == full[2 * step:], f"resume from step {step}"


def test_missing_data_path_refuses_before_any_logger_starts(make_config, tmp_path):
    """W&B (offline) would otherwise open a run, and print how to sync it, for a run that
    cannot start; the refusal comes before the loggers and the Trainer are built."""
    pytest.importorskip("wandb", reason="the check is about the W&B logger's side effects")
    from mamba_train.train import train

    cfg = make_config(f"data.path={tmp_path}/nowhere", "logger=wandb", "logger.wandb.mode=offline")
    with pytest.raises(DataError, match="nowhere/train does not exist"):
        train(cfg)
    run_dir = Path(cfg.run_dir)
    assert not (run_dir / "wandb").exists() and not (run_dir / "checkpoints").exists()


@pytest.mark.parametrize("sources, expected", [
    ("abc", "data.sources='abc' must be a list"),  # a ValueError from dict() inside Hydra
    ([{"path": "a", "weight": -1}, {"path": "b"}], "data.sources weight of a must be a finite number > 0, got -1"),
    ([{"path": "a", "weight": "x"}], "got 'x'"),
    ([{"weight": 1}], "each of data.sources needs a 'path'"),
])
def test_a_bad_mixture_is_refused_when_the_data_module_is_made(sources, expected):
    """A negative weight was a ValueError traceback from the sampler inside fit()."""
    with pytest.raises(DataError, match=expected):
        TokenDataModule(sources=sources, seq_len=8, micro_batch_size=1)
