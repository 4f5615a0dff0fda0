"""Global batch arithmetic: tokens/step = micro_batch × seq_len × world_size × accumulation.

The recipes fix the *global* batch in tokens (0.5M or 1M in the papers); the accumulation is
derived here from the world size actually running, so the same recipe trains the same model on
1 GPU or 64.
"""

from __future__ import annotations

from mamba_train.errors import MambaTrainError


# trainer.accelerator values planned_world_size knows how to count (config_checks.RULES)
ACCELERATORS = ("auto", "cpu", "cuda", "gpu", "mps")


class BatchSizeError(MambaTrainError, ValueError):
    pass


def grad_accumulation(global_batch_tokens: int, micro_batch_size: int, seq_len: int,
                      world_size: int) -> int:
    per_pass = micro_batch_size * seq_len * world_size
    if global_batch_tokens % per_pass:
        fits = [m for m in range(micro_batch_size, 0, -1)
                if global_batch_tokens % (m * seq_len * world_size) == 0]
        lo = max(per_pass, global_batch_tokens // per_pass * per_pass)
        fix = (f"data.micro_batch_size={fits[0]} keeps this global batch (accumulation "
               f"{global_batch_tokens // (fits[0] * seq_len * world_size)}); otherwise set "
               if fits else "set ")
        raise BatchSizeError(
            f"train.global_batch_tokens={global_batch_tokens} is not a multiple of "
            f"data.micro_batch_size × data.seq_len × world_size = {micro_batch_size} × {seq_len} × "
            f"{world_size} = {per_pass}; {fix}train.global_batch_tokens to a multiple of "
            f"{per_pass} such as {lo}"
        )
    return global_batch_tokens // per_pass


def planned_world_size(accelerator: str, devices, num_nodes: int) -> int:
    """The number of processes the Trainer will run, before it is built (the accumulation and
    the validation cadence are Trainer arguments that depend on it). Lightning's own rules for
    ``accelerator``/``devices`` (``auto``, ``-1``, a count, a list); ``train`` checks the built
    Trainer against it."""
    from lightning.pytorch.accelerators import CPUAccelerator, CUDAAccelerator, MPSAccelerator

    if accelerator == "auto":
        accelerator = ("mps" if MPSAccelerator.is_available()
                       else "cuda" if CUDAAccelerator.is_available() else "cpu")
    kinds = {"cpu": CPUAccelerator, "cuda": CUDAAccelerator, "mps": MPSAccelerator,
             "gpu": MPSAccelerator if MPSAccelerator.is_available() else CUDAAccelerator}
    kind = kinds[accelerator]
    parsed = kind.parse_devices(kind.auto_device_count() if devices == "auto" else devices)
    per_node = len(parsed) if isinstance(parsed, (list, tuple)) else int(parsed)
    return per_node * int(num_nodes)
