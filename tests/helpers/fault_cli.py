"""``python -m mamba_train`` with faults injected from environment variables (tests/helpers/faults.py).

MT_FAULT_STEP_SLEEP=S       sleep S seconds in every training step (so a test can hit a moment)
MT_FAULT_HOLD_WHILE=PATH    from step 1 on, every training step waits while PATH exists
MT_FAULT_SLOW_SAVE=S        write checkpoints in 64 KiB pieces over ~S seconds (kill mid-write)
MT_FAULT_ENOSPC_AT_SAVE=N   the N-th checkpoint write (1-based) fails half-way with ENOSPC
MT_FAULT_NAN_GRAD_AT=K      at optimizer step K one gradient gets an inf (the loss stays finite)
MT_FAULT_NAN_LOSS_FROM=K    every loss from step K on is NaN (a diverged run)
MT_FAULT_GRAPH_STEP_ON_CPU=1  run the CUDA-graph step's bookkeeping on CPU (no capture)
MT_FAULT_ENOSPC_PLOT=1      saving the loss plot fails half-way with ENOSPC (a disk full at the end)
MT_FAULT_KILL_IN_VAL_AT=K   SIGKILL inside the validation that follows optimizer step K
"""

import errno
import os
import re
import time

import torch

env = os.environ.get
_saves = {"n": 0}
_real_save = torch.save


class _SlowFile:
    def __init__(self, f, seconds):
        self.f, self.pause = f, seconds / 32

    def write(self, b):
        for i in range(0, len(b), 1 << 16):
            self.f.write(b[i:i + (1 << 16)])
            self.f.flush()
            time.sleep(self.pause)
        return len(b)

    def __getattr__(self, name):
        return getattr(self.f, name)


def _faulty_save(obj, f, *args, **kwargs):
    name = getattr(f, "name", str(f))
    if not re.search(r"\.ckpt\..*tmp", str(name)):  # only checkpoint writes (fileio.atomic_write)
        return _real_save(obj, f, *args, **kwargs)
    _saves["n"] += 1
    if env("MT_FAULT_ENOSPC_AT_SAVE") and _saves["n"] >= int(env("MT_FAULT_ENOSPC_AT_SAVE")):
        f.write(b"\0" * 4096)  # some bytes made it, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if env("MT_FAULT_SLOW_SAVE"):
        return _real_save(obj, _SlowFile(f, float(env("MT_FAULT_SLOW_SAVE"))), *args, **kwargs)
    return _real_save(obj, f, *args, **kwargs)


torch.save = _faulty_save

from mamba_train.training.step.module import MambaLMModule  # noqa: E402

if env("MT_FAULT_STEP_SLEEP") or env("MT_FAULT_NAN_LOSS_FROM") or env("MT_FAULT_HOLD_WHILE"):
    _loss = MambaLMModule._loss

    def _loss_with_faults(self, batch):
        loss = _loss(self, batch)
        if self.training:
            time.sleep(float(env("MT_FAULT_STEP_SLEEP", "0")))
            while env("MT_FAULT_HOLD_WHILE") and self.global_step >= 1 and os.path.exists(env("MT_FAULT_HOLD_WHILE")):
                time.sleep(0.05)
            if env("MT_FAULT_NAN_LOSS_FROM") and self.global_step >= int(env("MT_FAULT_NAN_LOSS_FROM")):
                loss = loss * float("nan")
        return loss
    MambaLMModule._loss = _loss_with_faults

if env("MT_FAULT_NAN_GRAD_AT"):
    _before = MambaLMModule.on_before_optimizer_step

    def _poison(self, optimizer):
        if self.global_step == int(env("MT_FAULT_NAN_GRAD_AT")):
            p = optimizer.param_groups[0]["params"][0]
            if p.grad is not None:
                p.grad.view(-1)[0] = float("inf")
        return _before(self, optimizer)
    MambaLMModule.on_before_optimizer_step = _poison

if env("MT_FAULT_KILL_IN_VAL_AT"):
    import signal
    _val_step = MambaLMModule.validation_step

    def _killed_in_val(self, batch, batch_idx):
        if self.global_step == int(env("MT_FAULT_KILL_IN_VAL_AT")) and not self.trainer.sanity_checking:
            os.kill(os.getpid(), signal.SIGKILL)
        return _val_step(self, batch, batch_idx)
    MambaLMModule.validation_step = _killed_in_val

if env("MT_FAULT_GRAPH_STEP_ON_CPU"):
    import mamba_train.training.step.cuda_graph as cuda_graph
    cuda_graph.graph_blockers = lambda trainer, module: []

if env("MT_FAULT_ENOSPC_PLOT"):
    import matplotlib.figure

    def _full_disk_savefig(self, fname, *args, **kwargs):
        with open(fname, "wb") as f:
            f.write(b"\x89PNG")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    matplotlib.figure.Figure.savefig = _full_disk_savefig

from mamba_train.cli.train import main  # noqa: E402

main()
