"""Non-finite losses *and gradients*: the optimizer step is masked on the device, no host sync.

Mamba-2 can produce non-finite gradients under a finite loss (state-spaces/mamba #445), so
looking at the loss alone lets the step poison the weights. Before every optimizer step (after
the last micro-batch's backward, before clipping) one flag is computed on the device: any
micro-batch loss of the step non-finite, or any gradient holding a NaN/inf (max-abs norm per
tensor, one ``_foreach_norm``). Then:

* fused optimizers (``torch.optim.AdamW(fused=True)``, the GPU recipes) get it as their
  ``found_inf`` argument, the one ``GradScaler`` uses: the kernel leaves the weights, the moments
  and the step count untouched when it is set, all without the host reading it -- which is what
  the captured CUDA-graph step needs;
* other optimizers: the host reads the flag (one sync per step) and drops the gradients of a
  bad step (``p.grad = None``: PyTorch optimizers then leave those parameters and their state
  alone).

The bookkeeping (first bad step, the current run of skipped steps, the steps skipped since the
last look, which parameters had non-finite gradients) stays on the device too and is read by
``poll`` -- every ``log_every_n_steps``, before any checkpoint is written, and at the end:

* ``nan_policy=stop``: from the first bad step on no update is applied, and ``poll`` raises,
  naming the step and the parameters;
* ``nan_policy=skip``: ``poll`` warns once per skipped step and raises after
  ``max_consecutive_skips`` skipped steps in a row (a diverged run does not "finish" silently).
"""

from __future__ import annotations

import logging

import torch

from mamba_train.errors import MambaTrainError

log = logging.getLogger(__name__)
NAN_POLICIES = ("stop", "skip")  # module.nan_policy


class NonFiniteLossError(MambaTrainError, FloatingPointError):
    """Non-finite loss or gradients under ``nan_policy=stop``, or too many skipped steps in a row."""


def _names(flags: list[bool], names: list[str], loss_bad: bool, limit: int = 6) -> str:
    bad = [n for n, f in zip(names, flags) if f]
    if loss_bad:
        return "the loss itself" + (" (so in every gradient)" if len(bad) == len(names) else "")
    if not bad:
        return "none of the gradients"
    more = f" and {len(bad) - limit} more" if len(bad) > limit else ""
    return ", ".join(bad[:limit]) + more


class NonFiniteGuard:
    def __init__(self, policy: str = "stop", max_consecutive_skips: int = 10, window: int = 50):
        self.policy = policy
        self.max_consecutive_skips = max_consecutive_skips
        self.window = max(1, window)
        self._state: dict[str, torch.Tensor] | None = None
        self._loss_bad: torch.Tensor | None = None
        self._names: list[str] = []
        self._warned_up_to = -1
        self.skipped = 0  # host copy, as of the last poll
        self._host_path_noted = False
        self._params_key: tuple | None = None
        self._params: tuple[list, list[str]] = ([], [])

    # ------------------------------------------------------------------ per micro-batch / step
    def note_loss(self, loss: torch.Tensor) -> None:
        bad = ~torch.isfinite(loss.detach())
        self._loss_bad = bad if self._loss_bad is None else self._loss_bad | bad

    def _init_state(self, n_params: int, device: torch.device) -> dict[str, torch.Tensor]:
        def full(value, size=(), dtype=torch.long):
            return torch.full(size, value, dtype=dtype, device=device)
        return {"first_bad": full(-1), "first_params": full(False, (n_params,), torch.bool),
                "first_loss": full(False, (), torch.bool), "run_loss": full(False, (), torch.bool),
                "run": full(0), "run_start": full(-1),
                "run_params": full(False, (n_params,), torch.bool),
                "skipped": full(0), "recent": full(-1, (self.window,))}

    def before_optimizer_step(self, optimizer: torch.optim.Optimizer, step: int,
                              reduce_max=None, mask: bool = True) -> None:
        """Decide (on the device) whether this step's update is applied, and mask it if not.

        ``reduce_max``: agree across ranks where each holds only a shard of the gradients.
        ``mask=False``: only record (an engine that applies the step itself, DeepSpeed)."""
        params, names = self._parameters(optimizer)
        grads = [p.grad for p in params]
        if any(g is None for g in grads):  # e.g. unused parameters: only those with a gradient
            kept = [(p, n) for p, n in zip(params, names) if p.grad is not None]
            params, names = [p for p, _ in kept], [n for _, n in kept]
            grads = [p.grad for p in params]
        # FSDP2 (DTensor) gradients: this rank's shard; reduce_max agrees across the ranks
        grads = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
        if grads:
            device = grads[0].device
            norms = torch._foreach_norm(grads, float("inf"))
            try:
                per_param = ~torch.isfinite(torch.stack(norms))
            except RuntimeError:  # gradients on more than one device
                per_param = ~torch.isfinite(torch.stack([n.to(device) for n in norms]))
        elif self._loss_bad is not None:  # no gradient visible here (partitioned): the loss only
            device = self._loss_bad.device
            per_param = torch.zeros(0, dtype=torch.bool, device=device)
        else:
            return
        loss_bad = (self._loss_bad.to(device) if self._loss_bad is not None
                    else torch.zeros((), dtype=torch.bool, device=device))
        found = per_param.any() | loss_bad
        self._loss_bad = None
        if reduce_max is not None:
            found = reduce_max(found)
        if self._state is None or self._state["first_params"].numel() != len(grads):
            self._state = self._init_state(len(grads), device)
            self._names = list(names)
        s = self._state
        first_time = found & (s["first_bad"] < 0)
        s["first_params"] = torch.where(first_time, per_param, s["first_params"])
        s["first_bad"] = torch.where(first_time, step, s["first_bad"])
        s["first_loss"] = torch.where(first_time, loss_bad, s["first_loss"])
        starts_run = found & (s["run"] == 0)
        s["run_params"] = torch.where(starts_run, per_param, s["run_params"])
        s["run_start"] = torch.where(starts_run, step, s["run_start"])
        s["run_loss"] = torch.where(starts_run, loss_bad, s["run_loss"])
        s["run"] = torch.where(found, s["run"] + 1, 0)
        s["skipped"] += found.long()
        s["recent"][step % self.window] = torch.where(found, step, -1)
        # stop: nothing is applied from the first bad step on, until poll() raises
        apply_none = found | (s["first_bad"] >= 0) if self.policy == "stop" else found
        if mask and grads:
            self._mask(optimizer, apply_none, params)

    def _parameters(self, optimizer: torch.optim.Optimizer) -> tuple[list, list[str]]:
        """The optimizer's parameters and their names, flattened once per optimizer (not every
        step: a Python pass over every parameter per step costs the host-bound loop)."""
        key = (id(optimizer), tuple((id(g["params"]), len(g["params"])) for g in optimizer.param_groups))
        if self._params_key != key:
            params = [p for g in optimizer.param_groups for p in g["params"]]
            names = [n for g in optimizer.param_groups
                     for n in g.get("param_names", [f"param{i}" for i in range(len(g["params"]))])]
            self._params_key, self._params = key, (params, names)
        return self._params

    def _mask(self, optimizer, found: torch.Tensor, params: list[torch.nn.Parameter]) -> None:
        if getattr(optimizer, "defaults", {}).get("fused"):
            optimizer.found_inf = found.float()  # read by the fused kernel, on the device
            return
        if not self._host_path_noted and found.is_cuda:  # on a CPU the read costs nothing
            log.info("non-finite check: the optimizer is not fused, so each step's flag is read "
                     "on the host (one sync per step; optim.optimizer.fused=true avoids it)")
            self._host_path_noted = True
        if bool(found):
            for p in params:
                p.grad = None

    # ------------------------------------------------------------------ host side
    def poll(self, last_checkpoint: str | None = None) -> None:
        """Read the device bookkeeping (one sync), warn about new skips, raise per the policy."""
        if self._state is None:
            return
        s = self._state
        first_bad, run, run_start, skipped = (int(v) for v in torch.stack(
            [s["first_bad"], s["run"], s["run_start"], s["skipped"]]).tolist())
        self.skipped = skipped
        where = f"; last checkpoint: {last_checkpoint}" if last_checkpoint else ""
        if self.policy == "stop" and first_bad >= 0:
            raise NonFiniteLossError(
                f"non-finite loss or gradients (NaN/inf) at step {first_bad}, in "
                f"{_names(s['first_params'].tolist(), self._names, bool(s['first_loss']))}; that step's update was not "
                "applied and no checkpoint was written after it, so the last checkpoint is the "
                f"last good state{where}. Lower the LR, check the data, or set "
                "module.nan_policy=skip to skip such steps.")
        if self.policy != "skip" or skipped == 0:
            return
        new = sorted(v for v in s["recent"].tolist() if v > self._warned_up_to)
        for step in new:
            log.warning("nan_policy=skip: step %d skipped (non-finite loss or gradients; weights "
                        "and optimizer state left as they were); %d skipped so far", step, skipped)
        self._warned_up_to = max([self._warned_up_to, *new])
        if run >= self.max_consecutive_skips:
            raise NonFiniteLossError(
                f"nan_policy=skip: {run} optimizer steps in a row were skipped (steps "
                f"{run_start}..{run_start + run - 1}, first non-finite in "
                f"{_names(s['run_params'].tolist(), self._names, bool(s['run_loss']))}): the run has diverged. No "
                f"checkpoint was written during those steps{where}. Resume from it with a lower "
                "optim.lr, check the data, or raise module.max_consecutive_skips.")

    def poll_counts(self) -> None:
        """Refresh ``skipped`` only (one sync), without warning or raising."""
        if self._state is not None:
            self.skipped = int(self._state["skipped"])

    def in_skip_run(self) -> bool:
        """Whether the last step(s) were skipped (one sync): a checkpoint now would hold the
        state that keeps failing, so it is not written (the last good one stays on disk)."""
        return self._state is not None and int(self._state["run"]) > 0

    def skipped_total(self) -> torch.Tensor | int:
        """Skipped steps so far, as a device scalar (for logging without a sync)."""
        return self._state["skipped"].float() if self._state is not None else 0.0
