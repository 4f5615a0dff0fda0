"""``module.cuda_graph``: the graph step's bookkeeping (flat gradient buffer zeroed in place,
backward done in ``training_step``, its own DDP all-reduce) gives the same training as the
plain Lightning path, and the mode is refused or skipped, with its reason, where capture is
impossible. Capture itself needs a GPU: tests/gpu/test_cuda_graph_step.py compares captured and
eager trajectories there. On CPU, GraphedTrainStep never captures, so forcing it on here tests
everything around the graph."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

import mamba_train.training.step.cuda_graph as cuda_graph_mod
from conftest import TINY, compose_config, metric_by_step
from mamba_train.train import train
from mamba_train.training.step.cuda_graph import CudaGraphError, GraphedTrainStep

STEPS = 6
# accumulation 2 (512 tokens/step = 2 micro-batches of 4 × 64), validation inside the run (its
# zero-grad hook), clipping on (trainer default 1.0), checkpoints every 3 steps
COMMON = ["recipe=debug-mamba2", f"trainer.max_steps={STEPS}", "train.global_batch_tokens=512",
          "trainer.limit_val_batches=1", "train.val_every_n_steps=2", "logger=csv",
          "train.checkpoint_every_n_steps=3", "train.keep_last_k_checkpoints=-1",
          "trainer.accelerator=cpu"]


def _global_losses(run_dir: Path) -> dict[int, float]:
    return metric_by_step(run_dir, "train/global_loss")


@pytest.fixture
def force_graph_step(monkeypatch):
    monkeypatch.setattr(cuda_graph_mod, "graph_blockers", lambda trainer, module: [])


@pytest.fixture(scope="module")
def eager_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("eager")
    result = train(compose_config([*TINY, *COMMON, "module.cuda_graph=off", "run_name=eager"], out))
    assert result["module"].graph_step is None
    return result


def _assert_same_run(a: dict, b: dict) -> None:
    la, lb = _global_losses(a["run_dir"]), _global_losses(b["run_dir"])
    assert sorted(lb) and set(lb) <= set(la)
    for step in lb:
        assert lb[step] == la[step], (step, la, lb)
    pa, pb = a["module"].model.state_dict(), b["module"].model.state_dict()
    for k in pa:
        assert torch.equal(pa[k], pb[k]), k


class GradsInFlatBuffer(L.Callback):
    """After every batch (validation's zero-grad hook included) each ``.grad`` is still a view
    of the graph step's flat buffer: the addresses the graph writes to."""

    def __init__(self):
        self.checked = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = pl_module.graph_step
        storage = step.flat_grad.untyped_storage().data_ptr()
        assert all(p.grad.untyped_storage().data_ptr() == storage for p in step.params)
        self.checked += 1


def test_graph_step_trains_exactly_like_the_eager_path(eager_run, force_graph_step, tmp_path):
    check = GradsInFlatBuffer()
    run = train(compose_config([*TINY, *COMMON, "module.cuda_graph=on", "run_name=graph"], tmp_path),
                extra_callbacks=[check])
    step = run["module"].graph_step
    assert step is not None and not step.captured  # CPU: the bookkeeping without capture
    assert step.micro_steps == 2 * STEPS and check.checked == 2 * STEPS
    assert all(p.grad is None for p in step.params)  # released at the end of training
    summary = json.loads((run["run_dir"] / "summary.json").read_text())
    assert summary["training_step"].startswith("eager: graph-step bookkeeping without CUDA graphs")
    assert sorted(_global_losses(run["run_dir"])) == list(range(1, STEPS + 1))
    _assert_same_run(eager_run, run)


def test_graph_owned_gradients_train_exactly_like_the_eager_path(force_graph_step, tmp_path):
    """Accumulation 1 on one process: no flat buffer, the gradients are dropped at each step
    (on a GPU the captured graph then owns them) -- the same run as the plain path."""
    accumulation_1 = [*TINY, *COMMON, "train.global_batch_tokens=256"]
    eager = train(compose_config([*accumulation_1, "module.cuda_graph=off", "run_name=e1"], tmp_path))
    run = train(compose_config([*accumulation_1, "module.cuda_graph=on", "run_name=g1"], tmp_path))
    step = run["module"].graph_step
    assert step.graph_owns_grads and step.flat_grad is None and step.micro_steps == STEPS
    _assert_same_run(eager, run)


def test_graph_step_resume_is_exact(eager_run, force_graph_step, tmp_path):
    mid = eager_run["run_dir"] / "checkpoints" / "step0000003.ckpt"
    assert mid.is_file()
    resumed = train(compose_config([*TINY, *COMMON, "module.cuda_graph=on", "run_name=resumed",
                                    f"ckpt_path={mid}"], tmp_path))
    assert resumed["module"].graph_step is not None
    assert sorted(_global_losses(resumed["run_dir"])) == [4, 5, 6]
    _assert_same_run(eager_run, resumed)


def test_cuda_graph_on_is_refused_with_the_reasons(tmp_path):
    with pytest.raises(CudaGraphError, match=r"device is cpu.*cuda_graph=auto or off") as err:
        train(compose_config([*TINY, *COMMON, "trainer.max_steps=1", "module.cuda_graph=on",
                              "module.nan_policy=skip"], tmp_path))
    # nan_policy=skip decides on the device (training/step/nonfinite.py): no reason to stay eager
    assert "nan_policy" not in str(err.value)


def test_cuda_graph_auto_falls_back_to_eager_and_says_why(tmp_path):
    run = train(compose_config([*TINY, *COMMON, "trainer.max_steps=1", "module.cuda_graph=auto"],
                               tmp_path))
    assert run["module"].graph_step is None and run["trainer"].global_step == 1
    summary = json.loads((run["run_dir"] / "summary.json").read_text())
    assert summary["training_step"].startswith("eager: the device is cpu (CUDA graphs are for GPUs)")


def test_unknown_cuda_graph_mode_is_a_config_error(tmp_path):
    with pytest.raises(ValueError, match="module.cuda_graph='yes' must be auto, on, off"):
        train(compose_config([*TINY, *COMMON, "module.cuda_graph=yes"], tmp_path))
    with pytest.raises(ValueError, match="module.cuda_graph_allreduce='within' must be outside or inside"):
        train(compose_config([*TINY, *COMMON, "module.cuda_graph_allreduce=within"], tmp_path))


def test_all_reduce_inside_the_graph_needs_accumulation_1(monkeypatch):
    """Inside the graph the all-reduce would run after every micro-batch: refused, with the fix."""
    from types import SimpleNamespace

    monkeypatch.setattr(cuda_graph_mod, "graph_blockers", lambda trainer, module: [])
    trainer = SimpleNamespace(strategy=SimpleNamespace(), num_nodes=1, world_size=2,
                              accumulate_grad_batches=4)
    module = SimpleNamespace(cuda_graph_allreduce="inside")
    with pytest.raises(CudaGraphError, match="accumulates 4 micro-batches.*cuda_graph_allreduce=outside"):
        cuda_graph_mod.start_graph_step(trainer, module, "auto")


def test_graph_step_under_ddp_all_reduces_itself(eager_run, tmp_path):
    """2 gloo processes, accumulation 1 each, same global batch: the graph step's own
    all-reduce (DDP's reducer switched off) gives the 1-process trajectory."""
    script = Path(__file__).parent / "helpers" / "train_graph_step_on_cpu.py"
    cmd = [sys.executable, str(script), *TINY, *COMMON, "trainer.devices=2", "strategy=ddp",
           "module.cuda_graph=on", "run_name=ddp", f"paths.output_dir={tmp_path}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + "\n" + proc.stderr[-4000:]
    losses, reference = _global_losses(tmp_path / "ddp"), _global_losses(eager_run["run_dir"])
    assert sorted(losses) == list(range(1, STEPS + 1))
    for step, ref in reference.items():  # float summation order only
        assert losses[step] == pytest.approx(ref, abs=1e-4), (step, reference, losses)
    ckpt = torch.load(tmp_path / "ddp" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == STEPS


def test_static_buffers_follow_the_batches_until_capture():
    """A resumed run may start on an epoch's short last batch: that must not pin the shapes the
    graph is later captured with (the warm-up restarts with each new shape)."""
    weight = torch.nn.Parameter(torch.ones(3))
    step = GraphedTrainStep(lambda b: (b["x"] * weight).sum(), [weight], accumulate=1, warmup=2)
    short, full = {"x": torch.ones(1, 3)}, {"x": torch.ones(4, 3)}
    assert step.forward_backward(short).item() == 3.0
    step.zero_grad()  # the training step's zero_grad, at the end of each optimizer step
    assert step.forward_backward(full).item() == 12.0
    assert step._static["x"].shape == (4, 3) and step._steps_at_shape == 1
    assert torch.equal(weight.grad, torch.full((3,), 4.0))  # zeroed between the windows
    step.forward_backward(full)
    assert torch.equal(weight.grad, torch.full((3,), 8.0))  # accumulated in place


def test_auto_keeps_ddp_overlap_across_nodes(monkeypatch):
    from types import SimpleNamespace

    from lightning.pytorch.strategies import DDPStrategy

    monkeypatch.setattr(cuda_graph_mod, "graph_blockers", lambda trainer, module: [])
    trainer = SimpleNamespace(strategy=DDPStrategy(), num_nodes=2)
    step, reason = cuda_graph_mod.start_graph_step(trainer, None, "auto")
    assert step is None and "across nodes" in reason
    assert cuda_graph_mod.start_graph_step(trainer, None, "off") == (None, "eager: module.cuda_graph=off")
