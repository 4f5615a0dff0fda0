"""Non-finite gradients under a finite loss are never applied (eager and graph-step bookkeeping,
fused and foreach AdamW), the fused decision needs no host read, bad config values are named,
and the FSDP init check works where FSDP runs NO_SHARD (world size 1)."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import lightning as L
import pytest
import torch

from mamba_train.config_checks import ConfigValueError, check_config, config_problems
from mamba_train.train import train
from mamba_train.training.step.nonfinite import NonFiniteGuard, NonFiniteLossError

FAST = ["recipe=debug-mamba2", "trainer.limit_val_batches=1", "train.val_every_n_steps=1000",
        "logger=csv"]


class PoisonGradientAt(L.Callback):
    """At optimizer step ``step`` one gradient entry becomes inf (the loss stays finite); the
    weights and optimizer state are recorded right before and right after that step."""

    def __init__(self, step: int):
        self.step = step
        self.before = self.after = None

    @staticmethod
    def _state(pl_module, optimizer):
        return ({k: v.detach().clone() for k, v in pl_module.model.state_dict().items()},
                copy.deepcopy(optimizer.state_dict()["state"]))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):  # runs before the module's
        if trainer.global_step == self.step:
            group = optimizer.param_groups[0]
            group["params"][0].grad.view(-1)[0] = float("inf")
            self.poisoned = group["param_names"][0]
            self.before = self._state(pl_module, optimizer)
            self._optimizer = optimizer

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step + 1 and self.after is None and self.before is not None:
            self.after = self._state(pl_module, self._optimizer)


def _assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, (tuple, list)):  # (weights, optimizer state): `==` would compare tensors
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    else:
        assert a == b


@pytest.mark.parametrize("mode", [
    pytest.param(["optim.optimizer.fused=true"], id="eager-fused"),
    pytest.param(["optim.optimizer.fused=false"], id="eager-foreach"),
    # the graph step's bookkeeping on CPU (the decision code the captured step uses)
    pytest.param(["module.cuda_graph=on", "optim.optimizer.fused=true"], id="graph-owned-grads-fused"),
    pytest.param(["module.cuda_graph=on", "train.global_batch_tokens=512"], id="graph-flat-buffer-foreach",
                 marks=pytest.mark.slow),
])
def test_skip_leaves_weights_and_optimizer_state_of_a_bad_step_untouched(
        make_config, monkeypatch, caplog, mode):
    if "module.cuda_graph=on" in mode:
        import mamba_train.training.step.cuda_graph as cuda_graph
        monkeypatch.setattr(cuda_graph, "graph_blockers", lambda trainer, module: [])
    poison = PoisonGradientAt(2)
    with caplog.at_level(logging.WARNING):
        result = train(make_config(*FAST, "trainer.max_steps=5", "module.nan_policy=skip", *mode),
                       extra_callbacks=[poison])
    module = result["module"]
    if "module.cuda_graph=on" in mode:
        assert module.training_step_mode.startswith("eager: graph-step bookkeeping")
    (w0, s0), (w1, s1) = poison.before, poison.after
    _assert_same(w0, w1)  # step 3 (poisoned at global_step 2) was not applied ...
    _assert_same(s0, s1)  # ... nor did it move the moments or the step count
    assert result["trainer"].global_step == 5
    assert not all(torch.equal(w0[k], v) for k, v in module.model.state_dict().items())  # went on
    assert module.skipped_steps == 1
    assert json.loads((result["run_dir"] / "summary.json").read_text())["skipped_nonfinite_steps"] == 1
    assert "nan_policy=skip: step 3 skipped" in caplog.text


def test_stop_names_the_step_and_the_parameter_and_applies_nothing_after(make_config):
    poison = PoisonGradientAt(2)
    cfg = make_config(*FAST, "trainer.max_steps=6", "train.checkpoint_every_n_steps=2",
                      "trainer.log_every_n_steps=2")
    with pytest.raises(NonFiniteLossError, match="at step 3, in backbone") as err:
        train(cfg, extra_callbacks=[poison])
    assert poison.poisoned in str(err.value) and "the loss itself" not in str(err.value)
    ckpts = sorted(p.name for p in (Path(cfg.run_dir) / "checkpoints").glob("*.ckpt"))
    assert ckpts == ["last.ckpt", "step0000002.ckpt"]  # nothing written after the bad step
    _assert_same(poison.before[0], poison.after[0])


def _tiny_optimizer(fused: bool):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(8)), torch.nn.Parameter(torch.randn(3, 4))]
    optimizer = torch.optim.AdamW([{"params": params, "param_names": ["a", "b"]}], lr=0.1,
                                  fused=fused)
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()
    for p in params:
        p.grad = torch.ones_like(p)
    params[1].grad[1, 2] = float("nan")
    return params, optimizer


def test_the_fused_decision_is_never_read_on_the_host(monkeypatch):
    """What the captured step needs: no ``bool()``/``item()``/``tolist()`` of a device value;
    the foreach optimizer, which has no ``found_inf``, is the negative control."""
    def host_read(*args, **kwargs):
        raise AssertionError("the host read a device value")
    for fused in (True, False):
        params, optimizer = _tiny_optimizer(fused)
        before = [p.detach().clone() for p in params]
        guard = NonFiniteGuard("skip")
        with monkeypatch.context() as m:
            for name in ("__bool__", "item", "tolist"):
                m.setattr(torch.Tensor, name, host_read)
            if fused:
                guard.before_optimizer_step(optimizer, step=1)
            else:
                with pytest.raises(AssertionError, match="host read"):
                    guard.before_optimizer_step(optimizer, step=1)
                continue
        optimizer.step()
        assert all(torch.equal(a, p) for a, p in zip(before, params))
        assert int(optimizer.state[params[0]]["step"]) == 1
        guard.max_consecutive_skips = 1
        with pytest.raises(NonFiniteLossError, match="first non-finite in b"):
            guard.poll()


@pytest.mark.parametrize("override, key", [
    ("data.micro_batch_size=0", "data.micro_batch_size=0"),
    ("data.micro_batch_size=-8", "data.micro_batch_size=-8"),
    ("data.seq_len=0", "data.seq_len=0"),
    ("data.seq_len=abc", "data.seq_len='abc'"),
    ("optim.lr=-1", "optim.lr=-1"),
    ("optim.lr=0", "optim.lr=0"),
    ("trainer.max_steps=0", "trainer.max_steps=0"),
    ("train.global_batch_tokens=0", "train.global_batch_tokens=0"),
    ("train.checkpoint_every_n_steps=0", "train.checkpoint_every_n_steps=0"),
    ("module.nan_policy=ignore", "module.nan_policy='ignore'"),
    ("module.max_consecutive_skips=0", "module.max_consecutive_skips=0"),
    ("trainer.gradient_clip_val=-1", "trainer.gradient_clip_val=-1"),
    # each of these ran (inf) or ended in a Lightning traceback before
    ("optim.lr=inf", "optim.lr=inf"),
    ("trainer.gradient_clip_val=inf", "trainer.gradient_clip_val=inf"),
    ("trainer.devices=0", "trainer.devices=0"),
    ("trainer.devices=abc", "trainer.devices='abc'"),
    ("trainer.num_nodes=0", "trainer.num_nodes=0"),
    ("trainer.precision=bf17", "trainer.precision='bf17'"),
    ("trainer.accelerator=tpuu", "trainer.accelerator='tpuu'"),
    ("backend=bogus", "backend='bogus'"),
    ("+strategy.context_parallel_size=0", "strategy.context_parallel_size=0"),
])
def test_each_bad_value_is_named_with_what_to_set(make_config, override, key):
    cfg = make_config("recipe=debug", override)
    problems = config_problems(cfg)
    assert len(problems) == 1 and problems[0].startswith(f"{key} must be"), problems
    with pytest.raises(ConfigValueError, match="invalid config"):
        check_config(cfg)


@pytest.mark.parametrize("overrides, expected", [
    (["scheduler.warmup_steps=50", "trainer.max_steps=10"],
     "scheduler.warmup_steps=50 (set, or warmup_fraction x steps) must be in [0, trainer.max_steps=10]"),
    (["scheduler.warmup_fraction=-0.1"], "scheduler.warmup_fraction=-0.1 must be in [0, 1]"),
    (["scheduler.min_lr=-1"], "scheduler.min_lr=-1 must be in [0, optim.lr="),
    (["scheduler=wsd", "scheduler.decay_fraction=2"], "scheduler.decay_fraction=2 must be in [0, 1]"),
    (["scheduler=wsd", "scheduler.decay_shape=cubic"], "scheduler.decay_shape must be one of"),
    (["+scheduler.warmup=3"], "scheduler (mamba_train.training.step.schedule.warmup_cosine) cannot "
                              "be built: warmup_cosine() got an unexpected keyword argument 'warmup'"),
    (["optim.optimizer.eps=-1"], "optim.optimizer (torch.optim.AdamW) cannot be built: Invalid epsilon"),
    (["optim.optimizer.betas=[0.9,1.5]"], "Invalid beta parameter at index 1: 1.5"),
])
def test_the_optimizer_and_schedule_are_checked_before_the_run(make_config, overrides, expected):
    """They were built inside fit(): a traceback after the run directory was written (a negative
    min_lr or warm-up fraction even trained, the former at a negative LR at the end)."""
    problems = config_problems(make_config("recipe=debug", *overrides))
    assert len(problems) == 1 and expected in problems[0], problems


def test_every_recipe_passes_the_value_checks(make_config):
    for recipe in sorted(p.stem for p in (Path(__file__).parents[1] / "mamba_train/conf/recipe").glob("*.yaml")):
        assert config_problems(make_config(f"recipe={recipe}", tiny=False)) == [], recipe


def test_fsdp_init_check_under_no_shard_does_not_offload(tmp_path):
    """World size 1: FSDP runs FULL_SHARD as NO_SHARD, where torch refuses
    ``summon_full_params(offload_to_cpu=True)``; the gathering for the init check must not ask
    for it even on a GPU strategy (reported as cuda here, the module itself is on CPU)."""
    import torch.distributed as dist
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import ShardingStrategy

    from mamba_train import MambaLMConfig, build_model
    from mamba_train.models.init import check_ssm_init
    from mamba_train.training.step.strategies.sharded import gathered_parameters

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        model = build_model(MambaLMConfig(d_model=32, n_layer=2, vocab_size=64), backend="reference")
        root = FSDP(model, sharding_strategy=ShardingStrategy.FULL_SHARD, device_id=torch.device("cpu"))

        class OneGPUFSDP(FSDPStrategy):
            def __init__(self):  # only what gathered_parameters reads
                self._root = root
            model = property(lambda self: self._root)
            world_size = 1
            root_device = torch.device("cuda")
            sharding_strategy = ShardingStrategy.FULL_SHARD

        with gathered_parameters(OneGPUFSDP(), root):
            assert check_ssm_init(root.module) == 2
        with pytest.raises(NotImplementedError, match="NO_SHARD"):  # what used to be asked for
            with FSDP.summon_full_params(root, writeback=False, offload_to_cpu=True):
                pass
    finally:
        dist.destroy_process_group()


def test_last_among_sharded_checkpoints_is_the_newest_written_directory(tmp_path):
    """FSDP/DeepSpeed write a directory per checkpoint; the one preemption wrote last wins."""
    import os

    from mamba_train.training.run.resume import resolve_ckpt_path

    for name, age in (("step0000004.ckpt", 100), ("last.ckpt", 10), ("step0000002.ckpt", 200)):
        (tmp_path / name).mkdir()
        shard = tmp_path / name / "__0_0.distcp"
        shard.write_bytes(b"x")
        os.utime(shard, (1e9 - age, 1e9 - age))
    (tmp_path / "step0000006.ckpt").mkdir()  # empty: a write that never started
    assert resolve_ckpt_path(tmp_path, "last") == str(tmp_path / "last.ckpt")
