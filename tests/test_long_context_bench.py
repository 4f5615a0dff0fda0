"""benchmarks/long_context.py on CPU: the run order puts the targets first, the crossover is
found and interpolated from measured rows, and one measurement trains through the real task."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import long_context as lc  # noqa: E402


def test_plan_puts_the_target_numbers_first_and_covers_the_grid():
    order = lc.plan(["mamba2-370m", "transformerpp-370m", "mamba-370m"], lc.SEQ_LENS, [131072])
    assert order[:2] == [("mamba2-370m", 2048, "off"), ("transformerpp-370m", 2048, "off")]
    assert ("mamba2-370m", 65536, "off") in order[:6]
    grid = {(a, s) for a, s, p in order if p == "off" and s in lc.SEQ_LENS}
    assert len(grid) == 3 * len(lc.SEQ_LENS)
    assert ("mamba2-370m", 65536, "all") in order and ("mamba2-370m", 131072, "off") in order
    assert all(a != "mamba3-370m" for a, _, _ in order)


def _row(arm, seq_len, tok_s, ac="off"):
    return {"arm": arm, "seq_len": seq_len, "micro_batch": max(1, 65536 // seq_len),
            "tokens_per_step": 65536, "activation_checkpointing": ac, "tok_s": tok_s}


def test_crossover_is_measured_and_interpolated_in_log2(tmp_path):
    rows = [_row("transformerpp-370m", 2048, 100.0), _row("transformerpp-370m", 4096, 80.0),
            _row("transformerpp-370m", 8192, 40.0, ac="all"),
            _row("mamba2-370m", 2048, 50.0), _row("mamba2-370m", 4096, 80.0 / 1.0001),
            _row("mamba2-370m", 8192, 60.0)]
    rows.append({**_row("mamba2-370m", 8192, None), "status": "oom"})
    c = lc.crossover(rows, "mamba2-370m")
    assert c["first_win"] == 8192
    assert 4096 < c["interpolated"] < 8192
    assert lc.crossover(rows, "mamba-370m") is None
    summary = lc.summarize(rows)
    assert "mamba2_32k_over_2k" not in summary  # 32k was not measured
    assert summary["crossover_vs_transformerpp-370m"]["mamba2-370m"]["first_win"] == 8192
    lc.write({"device": "cpu", "date": "today", "tokens_per_step": 65536, "rows": rows}, tmp_path)
    assert (tmp_path / "long_context.png").stat().st_size > 1000


def test_one_measurement_trains_through_the_real_task_on_cpu(tmp_path, monkeypatch):
    monkeypatch.setattr(lc, "VOCAB", 4096)
    monkeypatch.setattr(lc, "BASE", ["recipe=debug-mamba2", "trainer.accelerator=cpu",
                                     "trainer.precision=32-true", "backend=reference",
                                     "model.d_model=64", "model.n_layer=2"])
    monkeypatch.setattr(lc, "ARMS", {"tiny": []})
    data = lc.synthetic_shards(tmp_path / "data", train_tokens=20_000, val_tokens=2_000, doc_len=48)
    args = type("A", (), {"warmup": 1, "steps": 2, "ssm_override": [], "doc_len": 48})()
    clock = lc.StepClock(1, 2, deadline=float("inf"))
    out = lc._train_once("tiny", 64, 4, "every_k", args, data, tmp_path / "runs", clock)
    assert out["steps_done"] == 3 and out["step_mode"].startswith("eager")
    assert clock.tok_s(256) > 0


def test_packed_documents_end_with_eos_at_the_asked_mean_length(tmp_path):
    from mamba_train.data.shards import TokenShards

    lc.synthetic_shards(tmp_path, train_tokens=200_000, val_tokens=20_000, doc_len=400)
    shards = TokenShards(tmp_path / "train")
    tokens = shards.tokens(0, shards.total_tokens)
    n_docs = int((tokens == 0).sum())
    assert 200_000 / 400 * 0.9 < n_docs < 200_000 / 400 * 1.1
