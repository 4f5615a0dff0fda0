"""Monitoring: analytic FLOPs vs a hand count, MFU arithmetic, grad norm before clipping, SSM
health, the W&B offline run (metric keys, uploaded config, resumed run keeps its id), and the
csv / tensorboard logger options."""

import csv
import glob
import json
import math
import struct
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY, compose_config
from mamba_train.models.config import MambaLMConfig
from mamba_train.models.flops import flops_breakdown, flops_per_token, matmul_params
from mamba_train.models.lm import MambaLM
from mamba_train.train import train
from mamba_train.training.run.callbacks.ssm_health import SSMHealthMonitor
from mamba_train.training.run.loggers import RUN_ID_FILE

FAST = ["trainer.limit_val_batches=2"]


# ---------------------------------------------------------------------------------- FLOPs
def test_flops_mamba1_hand_count():
    cfg = MambaLMConfig(d_model=64, n_layer=2, vocab_size=4096, ssm_cfg={"layer": "Mamba1"})
    d, di, n, r, V = 64, 128, 16, 4, 4096  # dt_rank = ceil(64/16) = 4
    per_layer = (d * 2 * di          # in_proj
                 + di * 4            # depthwise conv1d, d_conv=4
                 + di * (r + 2 * n)  # x_proj -> (dt, B, C)
                 + r * di            # dt_proj
                 + di * d)           # out_proj
    assert per_layer == 30208
    assert matmul_params(cfg) == 2 * per_layer + d * V  # + LM head (tied, still a matmul)
    scan = 9 * di * n + 2 * di  # 9·D·N (state-spaces/mamba#110) + D skip + z gate
    b = flops_breakdown(cfg, seq_len=64)
    assert (b.matmul, b.ssm, b.attention) == (2 * (2 * per_layer + d * V), 2 * scan, 0)
    assert flops_per_token(cfg, 64) == 3 * (2 * (2 * per_layer + d * V) + 2 * scan) == 2047488
    assert flops_per_token(cfg, 64, training=False) == 2047488 // 3


def test_flops_hybrid_mamba2_attention_mlp_hand_count():
    cfg = MambaLMConfig(d_model=64, n_layer=2, vocab_size=4096, d_intermediate=128,
                        ssm_cfg={"layer": "Mamba2", "d_state": 16, "headdim": 16, "chunk_size": 32},
                        attn_layer_idx=[1], attn_cfg={"causal": True, "num_heads": 4})
    d, V, T = 64, 4096, 64
    di, n, h, g = 128, 16, 8, 1
    mamba2 = d * (2 * di + 2 * g * n + h) + (di + 2 * g * n) * 4 + di * d  # in_proj, conv, out
    attn = d * (3 * d) + d * d            # qkv (num_heads_kv = num_heads), out_proj
    mlp = d * 2 * 128 + 128 * d           # fc1 (gated: 2x), fc2
    assert matmul_params(cfg) == mamba2 + attn + 2 * mlp + d * V
    q = 32  # chunk_size < seq_len
    ssd = 2 * q * (n * g + di) + 4 * n * di + di
    b = flops_breakdown(cfg, seq_len=T)
    assert b.ssm == ssd and b.attention == 4 * T * d
    assert flops_per_token(cfg, T) == 3 * (2 * matmul_params(cfg) + ssd + 4 * T * d)
    # a sequence shorter than the chunk is one chunk of its own length
    assert flops_breakdown(cfg, seq_len=16).ssm == 2 * 16 * (n * g + di) + 4 * n * di + di


# ---------------------------------------------------------------------------------- SSM health / grad norm
@pytest.mark.parametrize("layer", ["Mamba1", "Mamba2"])
def test_ssm_health_stats_match_the_parameters(layer):
    ssm = {"layer": layer, "d_state": 16, **({"headdim": 16, "chunk_size": 32} if layer == "Mamba2" else {})}
    model = MambaLM(MambaLMConfig(d_model=64, n_layer=2, vocab_size=256, ssm_cfg=ssm), backend="reference")
    mon = SSMHealthMonitor(every_n_steps=1)
    stats = mon.health_stats(model)
    expected_keys = {f"ssm/layer{i:02d}/{k}" for i in range(2)
                     for k in ("dt_min", "dt_median", "dt_max", "A_min", "A_max", "param_norm")}
    assert set(stats) == expected_keys | {"ssm/param_norm"}  # no update norm before a snapshot
    mixer = model.backbone.layers[1].mixer
    bias = mixer.dt_bias if layer == "Mamba2" else mixer.dt_proj.bias
    dt = F.softplus(bias.float())
    assert stats["ssm/layer01/dt_median"] == pytest.approx(dt.median().item())
    assert 1e-3 * 0.99 <= stats["ssm/layer01/dt_min"] <= stats["ssm/layer01/dt_max"] <= 0.1 * 1.01
    A = -torch.exp(mixer.A_log.float())
    assert stats["ssm/layer01/A_min"] == pytest.approx(A.min().item())
    assert stats["ssm/layer01/A_max"] == pytest.approx(A.max().item()) and A.max() < 0
    block_norm = torch.cat([p.flatten() for p in model.backbone.layers[1].parameters()]).norm()
    assert stats["ssm/layer01/param_norm"] == pytest.approx(block_norm.item(), rel=1e-5)

    mon.take_snapshot(model)
    with torch.no_grad():
        model.backbone.layers[0].mixer.out_proj.weight.add_(0.01)  # a known update
    stats = mon.health_stats(model)
    numel = model.backbone.layers[0].mixer.out_proj.weight.numel()
    assert stats["ssm/layer00/update_norm"] == pytest.approx(0.01 * math.sqrt(numel), rel=1e-4)
    assert stats["ssm/layer01/update_norm"] == 0.0
    assert stats["ssm/update_norm"] == pytest.approx(stats["ssm/layer00/update_norm"])


@pytest.mark.parametrize("clip_val, scale", [(0.0, 1.0), (1.0, 1 / 4), (100.0, 1.0)])
def test_the_step_clips_and_returns_the_norm_before_clipping(clip_val, scale):
    """The one owner of the logged grad norm: the training step's clip (replicated kind)."""
    from types import SimpleNamespace

    from mamba_train.training.step.train_step import TrainStep
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2, 2))
    a.grad, b.grad = torch.full((3,), 2.0), torch.full((2, 2), -1.0)
    step = TrainStep(loss_fn=None, nan_policy="stop", max_consecutive_skips=1, cuda_graph="off")
    step.kind, step.clip_val = "replicated", clip_val
    step.module = SimpleNamespace(parameters=lambda: iter([a, b]))
    assert step.clip().item() == pytest.approx(math.sqrt(3 * 4 + 4))  # 4.0, before clipping
    assert torch.allclose(a.grad, torch.full((3,), 2.0 * scale), rtol=1e-5)  # clipped to clip_val


# ---------------------------------------------------------------------------------- W&B offline run
def read_wandb_records(run_dir: Path) -> list:
    """Records of a W&B offline transaction log (``run-<id>.wandb``): a LevelDB-style log (7-byte
    header ``:W&B`` + magic + version, then 32 KiB blocks of [crc32c u32, length u16, type u8]
    fragments) of ``wandb_internal_pb2.Record`` protobufs -- what ``wandb sync`` uploads. Read
    here because wandb >= 0.2x writes no wandb-summary.json/history files for offline runs."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(run_dir).read_bytes() if Path(run_dir).is_file() else \
        next(Path(run_dir).glob("*.wandb")).read_bytes()
    assert data[:4] == b":W&B"
    block, pos, pending, out = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zero padding at the end of a block
            pos += left
            continue
        frag, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:
            chunks = [frag]
        elif kind == 2:
            pending, chunks = frag, []
        elif kind == 3:
            pending, chunks = pending + frag, []
        else:
            chunks, pending = [pending + frag], b""
        for c in chunks:
            rec = pb.Record()
            rec.ParseFromString(c)
            out.append(rec)
    return out


def wandb_offline_run(run_dir: Path) -> dict:
    records = read_wandb_records(run_dir)
    history, config, run_id = [], {}, None
    for rec in records:
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            history.append({"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in rec.history.item})
        elif kind == "run":
            run_id = rec.run.run_id
            for item in rec.run.config.update:
                config["/".join(item.nested_key) or item.key] = json.loads(item.value_json)
        elif kind == "config":
            for item in rec.config.update:
                config["/".join(item.nested_key) or item.key] = json.loads(item.value_json)
    return {"history": history, "config": config, "run_id": run_id}


@pytest.fixture(scope="module")
def wandb_runs(tmp_path_factory):
    """A 4-step run under logger=wandb (offline), then resumed to 6 steps from its last.ckpt."""
    out = tmp_path_factory.mktemp("wandb")
    common = [*TINY, "recipe=debug", "logger=wandb", "logger.wandb.mode=offline",
              "train.checkpoint_every_n_steps=2", "train.val_every_n_steps=2",
              "callbacks.ssm_health.every_n_steps=2", "callbacks.throughput.peak_flops=1e12", *FAST]
    first = train(compose_config([*common, "trainer.max_steps=4"], out))
    run_id = (first["run_dir"] / RUN_ID_FILE).read_text().strip()
    first_dirs = set(glob.glob(str(first["run_dir"] / "wandb" / "offline-run-*")))
    second = train(compose_config([*common, "trainer.max_steps=6", "ckpt_path=last"], out))
    second_dirs = set(glob.glob(str(second["run_dir"] / "wandb" / "offline-run-*"))) - first_dirs
    return {"run_dir": first["run_dir"], "run_id": run_id, "first": sorted(first_dirs),
            "second": sorted(second_dirs), "second_id": (second["run_dir"] / RUN_ID_FILE).read_text().strip()}


EXPECTED_KEYS = {
    "train/loss", "train/grad_norm", "train/lr", "val/loss", "val/ppl",
    "train/tokens_seen", "train/samples_seen", "train/tokens_per_sec", "train/samples_per_sec",
    "train/flops_per_sec", "train/mfu", "model/flops_per_token",
    "ssm/layer00/dt_median", "ssm/layer01/A_min", "ssm/layer00/update_norm", "ssm/param_norm",
}


def test_wandb_offline_run_has_the_metrics_and_the_config(wandb_runs):
    assert len(wandb_runs["first"]) == 1
    run = wandb_offline_run(Path(wandb_runs["first"][0]))
    assert run["run_id"] == wandb_runs["run_id"]
    logged = set().union(*run["history"])
    assert EXPECTED_KEYS <= logged, sorted(EXPECTED_KEYS - logged)
    steps = [h["trainer/global_step"] for h in run["history"] if "train/loss" in h]
    assert steps == [1, 2, 3, 4]  # the step each row follows, as in checkpoint names
    # the resolved Hydra config, not just the module's arguments
    assert run["config"]["model"]["d_model"] == 64
    assert run["config"]["train"]["global_batch_tokens"] == 256
    assert run["config"]["run_name"] == "debug"


def test_wandb_resumed_run_reuses_the_run_id(wandb_runs):
    assert wandb_runs["second_id"] == wandb_runs["run_id"]
    assert len(wandb_runs["second"]) == 1 and wandb_runs["second"][0].endswith(wandb_runs["run_id"])
    run = wandb_offline_run(Path(wandb_runs["second"][0]))
    assert run["run_id"] == wandb_runs["run_id"]
    steps = [h["trainer/global_step"] for h in run["history"] if "train/loss" in h]
    assert steps == [5, 6]  # continues where the first process stopped
    tokens = [h["train/tokens_seen"] for h in run["history"] if "train/tokens_seen" in h]
    assert tokens[-1] == 6 * 256  # exact across the resume


def test_fresh_run_gets_a_new_wandb_id(tmp_path):
    from mamba_train.training.run.loggers import resolve_run_id
    first = resolve_run_id(tmp_path, resume=False)
    assert resolve_run_id(tmp_path, resume=True) == first
    assert resolve_run_id(tmp_path, resume=False) != first
    assert (tmp_path / RUN_ID_FILE).read_text().strip() != first


def test_csv_is_written_alongside_wandb_and_mfu_adds_up(wandb_runs):
    with open(wandb_runs["run_dir"] / "metrics" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    fpt = next(float(r["model/flops_per_token"]) for r in rows if r.get("model/flops_per_token"))
    cfg = MambaLMConfig(d_model=64, n_layer=2, vocab_size=4096, ssm_cfg={"layer": "Mamba1"})
    assert fpt == flops_per_token(cfg, 64)
    rated = [r for r in rows if r.get("train/mfu")]
    assert rated
    for r in rated:
        tps, fps = float(r["train/tokens_per_sec"]), float(r["train/flops_per_sec"])
        assert fps == pytest.approx(tps * fpt, rel=1e-6)
        assert float(r["train/mfu"]) == pytest.approx(fps / 1e12, rel=1e-6)  # world size 1
        assert float(r["train/samples_per_sec"]) == pytest.approx(tps / 64, rel=1e-6)
    assert not any(k.startswith(("train/device/", "lr-")) for k in rows[0])  # one key each
    assert (wandb_runs["run_dir"] / "summary.json").is_file()


def test_wandb_missing_falls_back_to_a_no_op_logger(monkeypatch, tmp_path, caplog):
    from lightning.pytorch.loggers.logger import DummyLogger

    from mamba_train.training.run.loggers import wandb_logger
    monkeypatch.setitem(sys.modules, "wandb", None)  # "import wandb" raises ImportError
    caplog.set_level("INFO", logger="mamba_train.training.run.loggers")
    assert isinstance(wandb_logger(run_dir=str(tmp_path), project="p"), DummyLogger)
    (record,) = [r for r in caplog.records if "wandb" in r.getMessage()]
    assert record.levelname == "INFO" and "pip install wandb" in record.getMessage()


@pytest.mark.parametrize("logger", ["csv", "tensorboard"])
def test_other_logger_options_keep_the_csv(make_config, logger):
    result = train(make_config("recipe=debug", f"logger={logger}", "trainer.max_steps=2",
                               "trainer.gradient_clip_val=1e-4", "train.val_every_n_steps=1000", *FAST))
    run_dir = result["run_dir"]
    with open(run_dir / "metrics" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    norms = [float(r["train/grad_norm"]) for r in rows if r.get("train/grad_norm")]
    assert len(norms) == 2 and min(norms) > 1e-3  # logged before clipping to 1e-4
    assert any(r.get("train/tokens_per_sec") for r in rows)
    assert not (run_dir / "wandb").exists()
    if logger == "tensorboard":
        assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))


def test_excluded_time_leaves_the_training_clock():
    import time

    from lightning.pytorch.trainer.states import RunningStage

    from mamba_train.training.run.callbacks.throughput import StepThroughputMonitor
    mon = StepThroughputMonitor()
    mon._t0s[RunningStage.TRAINING] = t0 = 100.0
    with mon.excluded_time(torch.device("cpu")):
        time.sleep(0.05)
    assert mon._t0s[RunningStage.TRAINING] - t0 >= 0.05
