"""Scale-out on CPU: DDP, FSDP and DeepSpeed ZeRO runs with 2 processes (gloo) through the real
CLI give the same loss trajectory as one process with the same global batch; the SSM init check
passes on every rank; the strategy configs keep fp32 parameters; preemption saves at a step
boundary and the resume is exact.

Why the trajectories can match exactly: the loader deals global sample ``i`` to rank
``i % world_size`` (mamba_train/data/dataset.py). With micro-batch 4, one process with
accumulation 2 sees samples 0-3 then 4-7 in step 0; two processes with accumulation 1 see
0,2,4,6 (rank 0) and 1,3,5,7 (rank 1): the same 8 samples per optimizer step in another order,
and the averaged gradient is the same up to float summation order. ``train/global_loss`` (mean
over all micro-batches and ranks of a step) is compared; ``train/loss`` is only rank 0's last
micro-batch, which holds different samples in the two layouts.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import instantiate

from conftest import TINY, compose_config
from mamba_train.train import train
from mamba_train.training.step.strategies.policy import ParallelConfigError

STEPS = 4
# 512 tokens/step = 2 × micro-batch 4 × 64 tokens: accumulation 2 on 1 process, 1 on 2 processes
RUN = [*TINY, "recipe=debug-mamba2", f"trainer.max_steps={STEPS}", "train.global_batch_tokens=512",
       "trainer.limit_val_batches=2", "train.val_every_n_steps=1000", "logger=csv",
       "trainer.accelerator=cpu"]
has_deepspeed = pytest.mark.skipif(
    __import__("importlib").util.find_spec("deepspeed") is None, reason="deepspeed is not installed")


def global_losses(run_dir: Path) -> dict[int, float]:
    with open(run_dir / "metrics" / "metrics.csv") as f:
        return {int(r["step"]): float(r["train/global_loss"])
                for r in csv.DictReader(f) if r.get("train/global_loss")}


def run_cli(out: Path, *overrides: str, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "mamba_train", *RUN, *overrides, f"paths.output_dir={out}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "HYDRA_FULL_ERROR": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + "\n" + proc.stderr[-6000:]
    return proc


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    """The reference: one process, accumulation 2, same global batch and seed (per precision)."""
    cache: dict[str, dict] = {}

    def reference(precision: str = "32-true") -> dict:
        if precision not in cache:
            out = tmp_path_factory.mktemp("single")
            result = train(compose_config([*RUN, "trainer.devices=1", "run_name=single",
                                           f"trainer.precision={precision}"], out))
            assert result["trainer"].world_size == 1 and result["trainer"].accumulate_grad_batches == 2
            cache[precision] = {
                "losses": global_losses(result["run_dir"]),
                "state": {k: v.clone() for k, v in result["module"].model.state_dict().items()}}
        return cache[precision]
    return reference


def _assert_same_trajectory(reference: dict[int, float], losses: dict[int, float], tol: float) -> None:
    assert sorted(losses) == sorted(reference) == list(range(1, STEPS + 1)), (reference, losses)
    for step, ref in reference.items():
        assert losses[step] == pytest.approx(ref, abs=tol), (step, reference, losses)


def _assert_init_checked_on_both_ranks(run_dir: Path) -> None:
    rank0 = (run_dir / "mamba-train.log").read_text()         # Hydra's log of the launching process
    rank1 = (run_dir / "train_ddp_process_1.log").read_text()  # Lightning's child process, rank 1
    assert "SSM init check passed for 2 mixers on rank 0" in rank0
    assert "SSM init check passed for 2 mixers on rank 1" in rank1


# per-Block activation checkpointing and sharded (one file per rank) checkpoints on top, the same
# settings for FSDP1 and FSDP2 so that their trajectories can be compared step for step
SHARDED_EXTRAS = ["module.activation_checkpointing=all", "strategy.state_dict_type=sharded"]
FSDP = ["strategy=fsdp", *SHARDED_EXTRAS]
FSDP2 = ["strategy=fsdp2", "strategy.context_parallel_size=1", *SHARDED_EXTRAS]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """The run directory of a 2-process CLI run per strategy, each run once per module."""
    cache: dict[tuple, Path] = {}

    def run(*strategy: str) -> Path:
        if strategy not in cache:
            out = tmp_path_factory.mktemp("two")
            run_cli(out, "trainer.devices=2", *strategy, "run_name=two",
                    "train.checkpoint_every_n_steps=2")
            cache[strategy] = out / "two"
        return cache[strategy]
    return run


@pytest.mark.parametrize("strategy", [
    pytest.param(["strategy=ddp"], id="ddp"),
    pytest.param(FSDP, id="fsdp"),
    pytest.param(FSDP2, id="fsdp2"),
    # bf16-mixed: DeepSpeed's torch_autocast mode with fp32 module parameters (the fp32 guard runs
    # on every rank); the same numbers as DDP under Lightning's bf16 autocast, bit for bit, here
    pytest.param(["strategy=deepspeed_zero3", "strategy.allow_cpu=true", "trainer.precision=bf16-mixed"],
                 id="deepspeed_zero3-bf16", marks=has_deepspeed),
    pytest.param(["strategy=deepspeed_zero1", "strategy.allow_cpu=true"], id="deepspeed_zero1",
                 marks=[has_deepspeed, pytest.mark.slow]),
    pytest.param(["strategy=deepspeed_zero2", "strategy.allow_cpu=true"], id="deepspeed_zero2",
                 marks=[has_deepspeed, pytest.mark.slow]),
    # every block recomputed under ZeRO-3 (its hooks re-gather the parameters for the recompute)
    pytest.param(["strategy=deepspeed_zero3", "strategy.allow_cpu=true",
                  "module.activation_checkpointing=all"], id="deepspeed_zero3-checkpointed",
                 marks=[has_deepspeed, pytest.mark.slow]),
])
def test_two_processes_match_one_process(strategy, single_process, two_processes):
    run_dir = two_processes(*strategy)
    bf16 = "trainer.precision=bf16-mixed" in strategy
    reference = single_process("bf16-mixed" if bf16 else "32-true")
    # fp32: summation order only; bf16 autocast: rounding of differently-ordered partial sums
    _assert_same_trajectory(reference["losses"], global_losses(run_dir), tol=1e-3 if bf16 else 1e-4)
    _assert_init_checked_on_both_ranks(run_dir)
    last = run_dir / "checkpoints" / "last.ckpt"
    assert last.exists()
    if strategy == ["strategy=ddp"]:  # a plain file: the weights match the 1-process run too
        state = torch.load(last, weights_only=False)["state_dict"]
        for k, v in reference["state"].items():
            # float summation order differs; Adam moves each weight by up to lr=3e-3 per step,
            # and a rounding difference can tip a near-zero second moment: allow lr/10
            torch.testing.assert_close(state[f"model.{k}"], v, atol=3e-4, rtol=1e-3)
    if "strategy.state_dict_type=sharded" in strategy:
        assert last.is_dir() and len(list(last.glob("*.distcp"))) == 2  # one shard per rank


def test_fsdp2_matches_fsdp_step_for_step(single_process, two_processes):
    """What recommending FSDP2 over FSDP1 rests on (benchmarks/results/2026-12-08-fsdp2-vs-fsdp.md):
    the same samples on the same ranks, so the two differ only in how the gradient shards are
    reduced (one flat buffer per Block against one reduce-scatter per parameter) -- float
    summation order, a few ulps of the loss (~5e-7 at 7.5) after 4 steps, asserted at 1e-5 (10x
    below the 1e-4 of the one-process comparisons, which differ in accumulation order too)."""
    fsdp, fsdp2 = global_losses(two_processes(*FSDP)), global_losses(two_processes(*FSDP2))
    _assert_same_trajectory(fsdp, fsdp2, tol=1e-5)
    _assert_same_trajectory(single_process()["losses"], fsdp2, tol=1e-4)


@pytest.mark.slow
def test_fsdp_sharded_resume_is_exact(tmp_path):
    common = ["trainer.devices=2", "strategy=fsdp", "strategy.state_dict_type=sharded",
              "train.checkpoint_every_n_steps=2", "train.keep_last_k_checkpoints=-1"]
    run_cli(tmp_path, *common, "run_name=straight")
    mid = tmp_path / "straight" / "checkpoints" / "step0000002.ckpt"
    run_cli(tmp_path, *common, "run_name=resumed", f"ckpt_path={mid}")
    a, b = global_losses(tmp_path / "straight"), global_losses(tmp_path / "resumed")
    assert sorted(b) == [3, 4]
    assert all(a[s] == b[s] for s in b), (a, b)


# --------------------------------------------------------------------------------- configs
@pytest.mark.parametrize("name", ["ddp", "fsdp", "deepspeed_zero1", "deepspeed_zero2", "deepspeed_zero3"])
def test_strategy_configs_compose(name, tmp_path):
    cfg = compose_config([f"strategy={name}"], tmp_path)
    assert cfg.strategy._target_
    if name.startswith("deepspeed"):
        assert cfg.strategy.stage == int(name[-1]) and cfg.strategy.reduce_dtype == "float32"


def test_fsdp_strategy_wraps_blocks_with_fp32_parameters(tmp_path):
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from mamba_train.models.lm import Block

    cfg = compose_config(["strategy=fsdp", "strategy.state_dict_type=sharded"], tmp_path)
    s = instantiate(cfg.strategy)
    policy = s.kwargs["auto_wrap_policy"]
    assert isinstance(policy, ModuleWrapPolicy) and policy._module_classes == {Block}
    assert s.kwargs["use_orig_params"] is True and s._state_dict_type == "sharded"
    mp = s.mixed_precision
    assert (mp.param_dtype, mp.reduce_dtype, mp.buffer_dtype) == (torch.float32,) * 3
    # gradient clipping by global norm: the training step's sharded kind, FSDP's own clip
    from mamba_train.training.step.train_step import strategy_kind
    assert strategy_kind(s) == "sharded"


def test_fsdp_bf16_parameters_are_refused_unless_allowed(tmp_path, caplog):
    from mamba_train.train import _strategy

    cfg = compose_config(["strategy=fsdp", "strategy.param_dtype=bfloat16"], tmp_path)
    with pytest.raises(ParallelConfigError, match="A_log, D and the Δ bias"):
        _strategy(cfg.strategy)
    cfg = compose_config(["strategy=fsdp", "strategy.param_dtype=bfloat16",
                          "train.allow_low_precision_params=true"], tmp_path)
    assert _strategy(cfg.strategy).mixed_precision.param_dtype == torch.bfloat16
    assert "allow_low_precision_params=true" in caplog.text


@has_deepspeed
def test_deepspeed_bf16_mixed_keeps_fp32_module_parameters():
    from lightning.pytorch.plugins.precision import DeepSpeedPrecision

    from mamba_train.training.step.strategies.deepspeed import deepspeed_strategy

    s = deepspeed_strategy(stage=3)
    s.precision_plugin = DeepSpeedPrecision("bf16-mixed")
    s._format_config()
    assert s.config["bf16"] == {"enabled": False}  # DeepSpeed's bf16 mode would cast the module
    assert s.config["torch_autocast"]["enabled"] and s.config["torch_autocast"]["dtype"] == "bfloat16"
    assert s.config["torch_autocast"]["lower_precision_safe_modules"] == []  # fp32 gradient reduce
    s = deepspeed_strategy(stage=2, config={"bf16": {"enabled": True}, "zero_optimization": {"stage": 2}})
    s.precision_plugin = DeepSpeedPrecision("bf16-mixed")
    with pytest.raises(ParallelConfigError, match="16-bit module"):
        s._format_config()


class FirstStepGradients(L.Callback):
    """The full gradients the first optimizer step is taken with (DeepSpeed's partitions gathered)."""

    def __init__(self):
        self.grads: dict[str, torch.Tensor] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.grads:
            return
        from lightning.pytorch.strategies import DeepSpeedStrategy

        for name, p in pl_module.model.named_parameters():
            if isinstance(trainer.strategy, DeepSpeedStrategy):
                from deepspeed.utils import safe_get_full_grad
                grad = safe_get_full_grad(p)
            else:
                grad = p.grad
            self.grads[name] = grad.detach().clone().reshape(getattr(p, "ds_shape", p.shape))


@has_deepspeed
@pytest.mark.parametrize("stage", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_deepspeed_gradient_under_accumulation_is_the_plain_one(stage, tmp_path, monkeypatch):
    """Accumulation 2 on one process: DeepSpeed's gradient is the plain step's, not half of it
    (Lightning's closure divides the loss by the accumulation, the engine must not again)."""
    # DeepSpeed's in-process run exports a rendezvous and keeps its process group (and the
    # store's port) open: both end with this test, not with the pytest process
    for key in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK"):
        monkeypatch.setenv(key, os.environ.get(key, ""))  # recorded, so undo removes what is set later
        monkeypatch.delenv(key)
    grads = {}
    for name, extra in [("plain", []),
                        ("ds", [f"strategy=deepspeed_zero{stage}", "strategy.allow_cpu=true"])]:
        grab = FirstStepGradients()
        result = train(compose_config([*RUN, "trainer.devices=1", "trainer.max_steps=1",
                                       f"run_name={name}", *extra], tmp_path), [grab])
        assert result["trainer"].accumulate_grad_batches == 2
        grads[name] = grab.grads
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    assert grads["ds"].keys() == grads["plain"].keys() and grads["plain"]
    for key, plain in grads["plain"].items():
        torch.testing.assert_close(grads["ds"][key], plain, rtol=1e-5, atol=1e-7,
                                   msg=lambda m, key=key: f"{key}: {m}")


def test_cli_refuses_bf16_fsdp_parameters_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mamba_train", "recipe=debug", "strategy=fsdp",
                           "strategy.param_dtype=bf16", f"paths.output_dir={tmp_path}"],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HYDRA_FULL_ERROR": "0"})
    assert proc.returncode != 0
    assert "A_log, D and the Δ bias" in proc.stderr


# --------------------------------------------------------------------------------- preemption
class _SignalAt(L.Callback):
    """Sends SIGUSR1 to this process in the middle of an accumulation window of step ``step``."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step and batch_idx % trainer.accumulate_grad_batches == 1:
            os.kill(os.getpid(), signal.SIGUSR1)


def test_preemption_saves_at_the_step_boundary_and_resume_is_exact(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    common = [*RUN, "trainer.max_steps=6", "train.global_batch_tokens=768",  # accumulation 3
              "+callbacks.preemption._target_=mamba_train.training.run.callbacks.preemption.PreemptionCheckpoint"]
    straight = train(compose_config([*common, "run_name=straight"], tmp_path))
    previous = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)}
    cut = train(compose_config([*common, "run_name=cut"], tmp_path), extra_callbacks=[_SignalAt(2)])
    # every handler restored at teardown (two callbacks held SIGUSR1; Lightning held SIGTERM)
    assert {s: signal.getsignal(s) for s in previous} == previous
    # the signal came mid-window in step 3 (global_step 2): that step finished, then the save
    assert cut["trainer"].global_step == 3
    saved = torch.load(cut["run_dir"] / "checkpoints" / "last.ckpt", weights_only=False)
    assert saved["global_step"] == 3
    resumed = train(compose_config([*common, "run_name=cut", "ckpt_path=last"], tmp_path))
    assert resumed["trainer"].global_step == 6
    a, b = global_losses(straight["run_dir"]), global_losses(resumed["run_dir"])
    # the run dir's CSV holds the cut attempt's steps 1-3 and the resumed steps 4-6 (one log)
    assert sorted(b) == [1, 2, 3, 4, 5, 6]
    assert all(a[s] == b[s] for s in b), (a, b)


def test_preemption_agreement_across_ranks_is_read_one_boundary_late():
    """With 2+ ranks the all-reduced flag of boundary k is read at boundary k+1 (no host sync
    on the step just queued); every rank then decides at the same boundary."""
    from types import SimpleNamespace

    from mamba_train.training.run.callbacks.preemption import PreemptionCheckpoint

    other_rank_flag = {"value": 0.0}
    strategy = SimpleNamespace(root_device=torch.device("cpu"),
                               reduce=lambda t, reduce_op: t + other_rank_flag["value"])
    trainer = SimpleNamespace(world_size=2, strategy=strategy)
    cb = PreemptionCheckpoint()
    assert not cb._agreed(trainer, None)          # boundary 0: nothing pending yet
    other_rank_flag["value"] = 1.0                # the other rank got SIGUSR1 during step 1
    assert not cb._agreed(trainer, None)          # boundary 1 reads boundary 0's sum (0)
    assert cb._agreed(trainer, None)              # boundary 2 reads boundary 1's sum (1)
    single = SimpleNamespace(world_size=1, strategy=strategy)
    cb1 = PreemptionCheckpoint()
    cb1.received = True
    assert cb1._agreed(single, None)              # one rank: no collective, no delay


def test_fsdp1_numbered_optimizer_state_is_renumbered_in_group_order():
    """Lightning's FSDP1 full checkpoints number optimizer states by position in
    ``model.parameters()`` (``FSDP.rekey_optim_state_dict(..., PARAM_ID, model)``); our groups
    are sorted by name, so read as torch numbers them (group order) the moments land on other
    parameters. The renumbered state equals what the optimizer itself writes."""
    from functools import partial

    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import OptimStateKeyType

    from mamba_train.formats.checkpoint import optimizer_state_in_group_order
    from mamba_train.training.step.optim import build_optimizer

    # module order z, norm, a: neither the name order nor the decay/no-decay split
    model = torch.nn.ModuleDict({"z": torch.nn.Linear(2, 3), "norm": torch.nn.LayerNorm(3),
                                 "a": torch.nn.Linear(3, 5)})
    opt = build_optimizer(model, partial(torch.optim.AdamW, lr=1e-3), 0.1)
    model["a"](model["norm"](model["z"](torch.randn(4, 2)))).square().sum().backward()
    opt.step()
    torch_numbered = opt.state_dict()
    by_name = FSDP.rekey_optim_state_dict(torch_numbered, OptimStateKeyType.PARAM_NAME, model, optim=opt)
    lightning_numbered = FSDP.rekey_optim_state_dict(by_name, OptimStateKeyType.PARAM_ID, model)
    shapes = lambda s: {k: tuple(v["exp_avg"].shape) for k, v in s["state"].items()}  # noqa: E731
    assert shapes(lightning_numbered) != shapes(torch_numbered)  # the two numberings differ here
    renumbered = optimizer_state_in_group_order(lightning_numbered, opt, model.parameters())
    assert [g["params"] for g in renumbered["param_groups"]] == [g["params"] for g in torch_numbered["param_groups"]]
    assert renumbered["state"].keys() == torch_numbered["state"].keys()
    for k, v in torch_numbered["state"].items():
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(renumbered["state"][k][name], v[name]), (k, name)
    assert optimizer_state_in_group_order(torch_numbered, opt, model.parameters()) is torch_numbered
