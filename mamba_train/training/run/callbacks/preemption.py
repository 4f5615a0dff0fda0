"""Preemption-safe stop: on SIGUSR1 (SLURM's warning before the time limit, ``launch.sh``) save
``checkpoints/last.ckpt`` at the next optimizer-step boundary, requeue the job, stop cleanly.

Why not Lightning's own SLURM handler: it saves the checkpoint *inside the signal handler*, i.e.
at an arbitrary point of the step (mid gradient-accumulation, or while another rank is blocked in
a gradient all-reduce -- the checkpoint's barrier then pairs with the wrong collective), and it
writes ``hpc_ckpt_N.ckpt``, which ``ckpt_path=last`` does not look at. Here the handler only sets
a flag; at each optimizer-step boundary the ranks agree on it (one tiny all-reduce, only when
world size > 1), so every rank saves the same step together, in the normal control flow, the
same way ``ModelCheckpoint`` does (so the resume is exact, data position included). With more
than one rank the agreement is read one boundary late, so that it never blocks the host (see
``_agreed``). Installing the handler before Lightning registers its own keeps Lightning's
SIGUSR1 handler out.
"""

from __future__ import annotations

import logging
import os
import signal as _signal
import subprocess
import threading
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from mamba_train.training.run.cluster import parse_signal
from mamba_train.training.lightning_compat import replace_restored_signal_handler
from mamba_train.training.step.train_step import step_ended

log = logging.getLogger(__name__)
# per signal: the handler before any PreemptionCheckpoint took it, and how many hold it now
_ORIGINAL: dict[int, object] = {}
_HOLDERS: dict[int, int] = {}
UNSAVED_EXIT = 1  # a saved stop exits 128 + signal (as a shell reports a signal's death)


class PreemptionCheckpoint(L.Callback):
    """Args:
        signal: the signal(s) that announce the end (``SIGUSR1``: ``#SBATCH --signal=B:USR1@N``;
            the default config also stops on ``[SIGTERM, SIGINT]``: a scheduler's kill, Ctrl-C).
        requeue: run ``scontrol requeue $SLURM_JOB_ID`` (rank 0) after the checkpoint is saved.

    A second signal while the first is still waiting for the step boundary ends the process at
    once, unsaved, for a user who really wants out now: one line says so, and the exit status
    is 1, never the 128 + signal of a saved stop. After a saved stop ``stopped_by`` names the
    signal; ``train`` turns that into the exit status 128 + signal.
    """

    def __init__(self, signal: str | list[str] = "SIGUSR1", requeue: bool = True):
        names = [signal] if isinstance(signal, (str, int)) else list(signal)
        self.signums = [parse_signal(s) for s in names]
        self.signum = self.signums[0]
        self.requeue = requeue
        self.received = False
        self.stopped_by: _signal.Signals | None = None
        self.saved_step: int | None = None
        self.saved_path: str | None = None
        self._installed: set[_signal.Signals] = set()
        self._pending: _FlagOnHost | None = None

    # ------------------------------------------------------------------ signal
    def _handler(self, signum, frame) -> None:
        if self.received:  # a second signal: leave now, unsaved, and say so
            name = _signal.Signals(signum).name
            os.write(2, f"error: second {name} before the next step boundary: stopped at once, "
                        "without saving; the checkpoints written so far are intact (resume with "
                        "ckpt_path=last)\n".encode())
            os._exit(UNSAVED_EXIT)
        self.received = True  # only a flag: the work happens at the next step boundary
        self.signum = _signal.Signals(signum)

    def _install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for s in self.signums:
            if s not in self._installed:  # the first install of this run: remember what it replaces
                _ORIGINAL.setdefault(s, _signal.getsignal(s))
                _HOLDERS[s] = _HOLDERS.get(s, 0) + 1
                self._installed.add(s)
            _signal.signal(s, self._handler)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._install()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore(trainer)
        if self.saved_step is not None and self.requeue and trainer.is_global_zero:
            self._requeue()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception) -> None:
        self._restore(trainer)  # a failed fit skips the callbacks' teardown

    def _restore(self, trainer: L.Trainer) -> None:
        """Give each signal back the handler it had before the first of these callbacks took it
        (several may hold one signal: the default stop_signals and cluster=slurm's preemption),
        once the last of them lets go; Lightning, tearing down after the callbacks, would
        otherwise put back the handler it found at its start: ours."""
        if threading.current_thread() is not threading.main_thread():
            return
        for s in self._installed:
            _HOLDERS[s] -= 1
            if _HOLDERS[s] == 0:
                del _HOLDERS[s]
                original = _ORIGINAL.pop(s)
                _signal.signal(s, original)
                replace_restored_signal_handler(trainer, s, original)
        self._installed.clear()

    # ------------------------------------------------------------------ training
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning registers its SIGTERM handler after ``setup``; it would stop the run at the
        # end of the current micro-batch, unsaved. Ours replaces it (it is restored at teardown).
        self._install()
        if "SLURM_JOB_ID" not in os.environ:  # a laptop or a plain shell: no scheduler to name
            log.info("training starts at step %d (rank %d)", trainer.global_step, trainer.global_rank)
            return
        log.info("training starts at step %d (rank %d, SLURM_RESTART_COUNT=%s, SLURM_JOB_ID=%s)",
                 trainer.global_step, trainer.global_rank, os.environ.get("SLURM_RESTART_COUNT", "0"),
                 os.environ["SLURM_JOB_ID"])

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs,
                           batch, batch_idx: int) -> None:
        if step_ended(pl_module) is None:
            return  # inside a gradient-accumulation window: not a step boundary
        if not self._agreed(trainer, pl_module):
            return
        path = self._checkpoint_path(trainer)
        # every rank: a collective for sharded strategies; the full checkpoint (optimizer and
        # loops too), said explicitly: Lightning logs a line when it has to default it
        trainer.save_checkpoint(path, weights_only=False)
        self.saved_step, self.saved_path, self.stopped_by = trainer.global_step, path, self.signum
        if trainer.is_global_zero:
            log.warning("preemption signal (%s): saved step %d to %s; stopping%s",
                        self.signum.name, trainer.global_step, path,
                        " and requeueing" if self.requeue and os.environ.get("SLURM_JOB_ID") else "")
        trainer.should_stop = True

    def _agreed(self, trainer: L.Trainer, pl_module: L.LightningModule) -> bool:
        """Whether any rank got the signal, decided one step boundary late.

        Reading the all-reduced flag at once would block the host until the GPU has finished
        the step (``.item()`` waits for everything queued before it), every step; host-bound
        training (Mamba-2, the captured step) loses the step it had queued ahead. So each
        boundary queues its reduction plus a copy to pinned memory, and the next boundary reads
        it after waiting only for that copy's event. Every rank reads the same reduced value at
        the same boundary, so they still save the same step, one step after the signal."""
        if trainer.world_size == 1:
            return self.received
        pending = self._pending
        flag = torch.tensor(float(self.received), device=trainer.strategy.root_device)
        self._pending = _FlagOnHost(trainer.strategy.reduce(flag, reduce_op="sum"))
        return pending is not None and pending.value() > 0

    @staticmethod
    def _checkpoint_path(trainer: L.Trainer) -> str:
        cb = trainer.checkpoint_callback
        if isinstance(cb, ModelCheckpoint) and cb.dirpath:
            return str(Path(cb.dirpath) / f"{cb.CHECKPOINT_NAME_LAST}{cb.FILE_EXTENSION}")
        return str(Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt")

    def _requeue(self) -> None:
        array_id, task_id = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
        job_id = f"{array_id}_{task_id}" if array_id and task_id else os.environ.get("SLURM_JOB_ID")
        if not job_id:
            log.warning("preempted at step %s outside SLURM: not requeueing; rerun with "
                        "ckpt_path=last to resume", self.saved_step)
            return
        result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
        if result.returncode == 0:
            log.warning("requeued SLURM job %s; it resumes from step %s", job_id, self.saved_step)
        else:
            log.error("scontrol requeue %s failed (%d): %s", job_id, result.returncode,
                      result.stderr.strip())


class _FlagOnHost:
    """A device scalar copied to pinned host memory without blocking; ``value()`` waits only
    for that copy (a CUDA event), not for the work queued after it."""

    def __init__(self, tensor: torch.Tensor):
        if tensor.is_cuda:
            self._host = torch.empty((), dtype=tensor.dtype, pin_memory=True)
            self._host.copy_(tensor, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host, self._event = tensor, None

    def value(self) -> float:
        if self._event is not None:
            self._event.synchronize()
        return float(self._host)
