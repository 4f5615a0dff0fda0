"""Numerics shared by the pure-PyTorch reference ops, plus the two ops every mixer uses.

Layouts and semantics follow ``mamba_ssm`` 2.3.2 operation by operation:

* ``causal_conv1d``  -- ``causal_conv1d_fn``: depthwise causal conv over (b, d, l), fp32 accumulation,
  optional SiLU, optional ``seq_idx`` (no mixing across document boundaries);
* ``gated_rms_norm`` -- ``layernorm_gated.rmsnorm_fn`` (group_size, norm_before_gate).

The scans live beside this module: ``selective_scan`` (Mamba-1), ``ssd`` (Mamba-2) and
``mamba3_ops`` (Mamba-3).

Precision: whatever the input dtype, the recurrence state and all decays are computed in fp32 (fp64
when the inputs are fp64), with autocast disabled inside the ops, exactly like the kernels; results
come back in the dtype of the main input (``u`` / ``x``).

``seq_idx`` (int32, (batch, seqlen), non-decreasing document numbers) makes the state restart at
every position where it changes: packed documents give the same outputs as separate runs.

Numerics: decays are only ever formed as ``exp`` of non-positive segment sums (or products of
factors in [0, 1]), never as ``exp(+cumsum) * exp(-cumsum)``, so long or fast-decaying sequences
cannot overflow.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

__all__ = ["causal_conv1d", "gated_rms_norm"]


# --------------------------------------------------------------------------------------- helpers
def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half/bf16/fp32 inputs, fp64 for fp64 inputs (the tests' exact mode)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _skip_and_gate(y: torch.Tensor, x: torch.Tensor, D: torch.Tensor | None,
                   z: torch.Tensor | None, cdt: torch.dtype) -> torch.Tensor:
    """The scans' epilogue: the skip ``y + D x`` (D shaped to broadcast against x), then the
    gate ``y * silu(z)``; shared by the chunked scans and their sequential oracles."""
    if D is not None:
        y = y + x * D.to(cdt)
    if z is not None:
        y = y * F.silu(z.to(cdt))
    return y


def _no_autocast(t: torch.Tensor):
    """Autocast would push the einsums/matmuls of the state math back to bf16: switch it off."""
    device_type = t.device.type
    if device_type not in ("cpu", "cuda", "xpu", "mps", "hpu"):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, enabled=False)


def recomputed(fn, *args):
    """fn(*args), with its intermediates recomputed in the backward (``torch.utils.checkpoint``)
    instead of kept: for the carried-state terms, whose inputs are small next to what they build."""
    if torch.is_grad_enabled() and any(torch.is_tensor(a) and a.requires_grad for a in args):
        from torch.utils.checkpoint import checkpoint
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def _doc_start_mask(seq_idx: torch.Tensor | None, seqlen: int) -> torch.Tensor | None:
    """(batch, seqlen) bool: True where a new document starts (seq_idx differs from the previous
    position). Position 0 is False: the state is zero there anyway."""
    if seq_idx is None:
        return None
    if seq_idx.shape[-1] != seqlen:
        raise ValueError(f"seq_idx has length {seq_idx.shape[-1]}, expected {seqlen}")
    start = torch.zeros(seq_idx.shape, dtype=torch.bool, device=seq_idx.device)
    start[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    return start


# --------------------------------------------------------------------------------- causal conv1d
def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  seq_idx: torch.Tensor | None = None, activation: str | None = "silu") -> torch.Tensor:
    """Depthwise causal convolution, ``causal_conv1d_fn`` semantics.

    x: (batch, dim, seqlen); weight: (dim, width) or (dim, 1, width) (``nn.Conv1d`` layout);
    bias: (dim,) or None; seq_idx: (batch, seqlen) int or None; activation: "silu"/"swish"/None.
    out[t] = bias + sum_k weight[k] * x[t - (width-1) + k], taps before the sequence start (or, with
    seq_idx, in another document) count as zero. Accumulates in fp32, returns x.dtype.
    """
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"activation must be None, 'silu' or 'swish', got {activation!r}")
    if weight.dim() == 3:
        weight = weight.squeeze(1)
    dim, width = weight.shape
    if x.dim() != 3 or x.shape[1] != dim:
        raise ValueError(f"x must be (batch, {dim}, seqlen), got {tuple(x.shape)}")
    seqlen = x.shape[-1]
    cdt = _compute_dtype(x.dtype)
    with _no_autocast(x):
        xf = x.to(cdt)
        w = weight.to(cdt)
        out = xf * w[:, width - 1, None]  # lag 0
        for lag in range(1, min(width, seqlen)):
            tap = xf[..., :-lag] * w[:, width - 1 - lag, None]
            if seq_idx is not None:
                same_doc = (seq_idx[:, lag:] == seq_idx[:, :-lag]).unsqueeze(1)
                tap = tap * same_doc.to(cdt)
            out = out + F.pad(tap, (lag, 0))
        if bias is not None:
            out = out + bias.to(cdt)[:, None]
        if activation is not None:
            out = F.silu(out)
    return out.to(x.dtype)


# ------------------------------------------------------------------------------ gated RMSNorm
def gated_rms_norm(x, weight, z=None, eps: float = 1e-6, group_size: int | None = None,
                   norm_before_gate: bool = True, bias=None):
    """``layernorm_gated.rmsnorm_fn``: RMSNorm over groups of ``group_size`` channels, gated by z.

    norm_before_gate=True: rmsnorm(x) * weight * silu(z); False: rmsnorm(x * silu(z)) * weight.
    group_size=None means one group over the whole last dimension. fp32 math, returns x.dtype.
    """
    cdt = _compute_dtype(x.dtype)
    N = x.shape[-1]
    gs = N if group_size is None else int(group_size)
    if N % gs:
        raise ValueError(f"group_size={gs} must divide the normalised dimension {N}")
    with _no_autocast(x):
        xf = x.to(cdt)
        gate = F.silu(z.to(cdt)) if z is not None else None
        if gate is not None and not norm_before_gate:
            xf = xf * gate
        xg = xf.unflatten(-1, (N // gs, gs))
        rstd = torch.rsqrt(xg.square().mean(dim=-1, keepdim=True) + eps)
        out = (xg * rstd).flatten(-2) * weight.to(cdt)
        if bias is not None:
            out = out + bias.to(cdt)
        if gate is not None and norm_before_gate:
            out = out * gate
    return out.to(x.dtype)
