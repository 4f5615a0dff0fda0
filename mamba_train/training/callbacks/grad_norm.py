"""Total gradient norm *before* clipping, once per optimizer step, without a host sync.

Lightning calls ``on_before_optimizer_step`` after the gradients are complete (accumulated,
all-reduced under DDP, unscaled under fp16 AMP) and before ``gradient_clip_val`` is applied, so
this is the norm the clipping decision sees. The norm stays a device tensor handed to
``LightningModule.log``, which reads it only at logging steps (like the loss).

Lightning's ``grad_norm`` utility returns one norm per parameter (hundreds of keys); the total is
what clipping and loss-spike forensics need, so ``torch.nn.utils.get_total_norm`` is used (one
fused ``foreach`` norm). Under FSDP each rank holds a shard of the gradients: the squared local
norms are summed across ranks (an all-reduce, no host sync). DeepSpeed ZeRO-2/3 keep gradients
in their own partitioned buffers (``p.grad`` is None); there the engine's own global norm is read
after its step.
"""

from __future__ import annotations

import lightning as L
import torch


def total_grad_norm(parameters, norm_type: float = 2.0) -> torch.Tensor | None:
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return None
    if hasattr(torch.nn.utils, "get_total_norm"):  # torch >= 2.6
        return torch.nn.utils.get_total_norm(grads, norm_type=norm_type)
    return torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(g, norm_type) for g in grads]), norm_type)


def _is_sharded(trainer: L.Trainer) -> bool:
    from lightning.pytorch.strategies import FSDPStrategy
    return isinstance(trainer.strategy, FSDPStrategy)


class GradNormMonitor(L.Callback):
    """Logs ``train/grad_norm`` (L2 norm of all gradients, before clipping)."""

    def __init__(self, key: str = "train/grad_norm"):
        self.key = key
        self._seen_grads = False

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        clips = getattr(pl_module, "clips_gradients_directly", None)
        if clips is not None and clips():
            return  # the module's clipping computes this norm anyway and logs it under train/grad_norm
        params = [p for group in optimizer.param_groups for p in group["params"]]
        norm = total_grad_norm(params)
        if _is_sharded(trainer) and torch.distributed.is_initialized():
            # every rank joins the all-reduce, also one whose shard holds no gradient
            sq = torch.zeros((), device=pl_module.device) if norm is None else norm.float() ** 2
            torch.distributed.all_reduce(sq)
            norm = sq.sqrt()
        if norm is None:  # DeepSpeed ZeRO-2/3 keep gradients in their own buffers: see below
            return
        self._seen_grads = True
        pl_module.log(self.key, norm.detach().float(), on_step=True, on_epoch=False)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs,
                           batch, batch_idx: int) -> None:
        """DeepSpeed computes the global (pre-clipping) norm inside its step; read it there."""
        engine = getattr(trainer.strategy, "deepspeed_engine", None)
        if self._seen_grads or engine is None or not hasattr(engine, "get_global_grad_norm"):
            return
        norm = engine.get_global_grad_norm()
        if norm is not None:
            pl_module.log(self.key, torch.as_tensor(norm, dtype=torch.float32, device=pl_module.device),
                          on_step=True, on_epoch=False)
