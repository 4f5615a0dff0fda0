"""Mixture-of-experts sublayer (``E`` in a layer pattern): a router, routed experts and optional
shared experts, dropless (every token reaches its top-k experts; no capacity factor).

Routers (``moe_cfg.router``), after the families transformers ships:

* ``softmax`` -- top-k of the router logits; ``norm_topk_prob=true`` softmaxes over the chosen k
  (Granite 4.0-H, ``GraniteMoeHybridTopKRouter``), ``false`` keeps the full softmax's
  probabilities of the chosen k (Jamba, Mixtral-style without renormalisation).
* ``sigmoid`` -- per-expert sigmoid scores; the choice adds a score-correction bias and keeps the
  ``topk_group`` best of ``n_group`` expert groups (each group ranked by the sum of its two best
  scores); the weights are the uncorrected scores of the chosen experts, optionally normalised,
  times ``routed_scaling_factor`` (Nemotron 3 / DeepSeek-V3, ``NemotronHTopkRouter``).

Balancing: the auxiliary loss ``n_experts * sum_e f_e * P_e`` (Switch Transformer, Fedus et al.
2021, eq. 4-6; ``f_e`` the fraction of the k·T assignments to expert e times k, ``P_e`` the mean
router probability), the router z-loss ``mean(logsumexp(logits)^2)`` (ST-MoE, Zoph et al. 2022),
both returned through :func:`aux_loss`; and the auxiliary-loss-free update of the correction
bias (DeepSeek-V3, Liu et al. 2024, sec. 2.1.2): after each optimizer step
``bias += rate * sign(mean_load - load_e)``, :func:`update_router_bias`.

Experts are two 3-D weights with the expert index first (``experts.fc1.weight`` (E, [2]I, D),
``experts.fc2.weight`` (E, D, I)), so expert parallelism can later shard dim 0 without renaming.
Two backends compute them: ``loop`` (one matmul per expert on the tokens routed to it, the
reference; its shapes depend on the routing, which reads the counts on the host) and ``grouped``
(assignments sorted by expert, ``torch._grouped_mm`` over the sorted rows with device-side
offsets: fixed shapes, no host round trip, so a CUDA graph captures it).

Per-layer statistics (expert load, router entropy) accumulate in device buffers on every
forward and are read by :func:`moe_stats` at log time (one host sync per log, not per step).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mamba_train.errors import MambaTrainError
from mamba_train.models.layers import make_mlp

ROUTERS = ("softmax", "sigmoid")
EXPERT_ACTS = ("swiglu", "relu2")
IMPLS = ("auto", "loop", "grouped")
MOE_DEFAULTS: dict[str, Any] = dict(
    n_experts=8, top_k=2, d_expert=0, act="swiglu", router="softmax", n_group=1, topk_group=1,
    norm_topk_prob=True, routed_scaling_factor=1.0, score_correction_bias=False, d_shared=0,
    aux_loss_coef=0.0, z_loss_coef=0.0, bias_update_rate=0.0, impl="auto")


class ExpertLinear(nn.Module):
    """``n_experts`` linear maps stored as one (E, out, in) weight; each expert initialised
    like an ``nn.Linear`` of its own shape."""

    def __init__(self, n_experts: int, in_features: int, out_features: int, device=None,
                 dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_experts, out_features, in_features,
                                               device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for w in self.weight.data.unbind(0):
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))


class Experts(nn.Module):
    def __init__(self, n_experts: int, d_model: int, d_expert: int, act: str, device=None,
                 dtype=None):
        super().__init__()
        self.act = act
        width = 2 * d_expert if act == "swiglu" else d_expert
        self.fc1 = ExpertLinear(n_experts, d_model, width, device=device, dtype=dtype)
        self.fc2 = ExpertLinear(n_experts, d_expert, d_model, device=device, dtype=dtype)

    def activation(self, h: torch.Tensor) -> torch.Tensor:
        if self.act == "swiglu":  # [up, gate], mamba_ssm's GatedMLP order
            up, gate = h.chunk(2, dim=-1)
            return up * F.silu(gate)
        return torch.square(F.relu(h))


class Router(nn.Module):
    def __init__(self, cfg: dict[str, Any], d_model: int, device=None, dtype=None):
        super().__init__()
        self.cfg = cfg
        n = cfg["n_experts"]
        self.weight = nn.Parameter(torch.empty(n, d_model, device=device, dtype=dtype))
        if cfg["score_correction_bias"]:
            # fp32 whatever the model dtype: moved by the bias update, not by the optimizer
            self.register_buffer("e_score_correction_bias",
                                 torch.zeros(n, device=device, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.e_score_correction_bias is not None:
            self.e_score_correction_bias.zero_()

    def forward(self, x: torch.Tensor):
        """(logits (T, E) fp32, probabilities for the aux loss (T, E), weights (T, k) fp32,
        expert indices (T, k))."""
        c = self.cfg
        logits = F.linear(x.float(), self.weight.float())
        k = c["top_k"]
        if c["router"] == "softmax":
            probs = logits.softmax(-1)
            if c["norm_topk_prob"]:
                top, idx = logits.topk(k, dim=-1)
                weights = top.softmax(-1)
            else:
                weights, idx = probs.topk(k, dim=-1)
        else:
            scores = logits.sigmoid()
            probs = scores / scores.sum(-1, keepdim=True)
            choice = scores if self.e_score_correction_bias is None else (
                scores + self.e_score_correction_bias)
            if c["n_group"] > 1:
                t, e = choice.shape
                grouped = choice.view(t, c["n_group"], e // c["n_group"])
                group_scores = grouped.topk(2, dim=-1)[0].sum(-1)
                keep = group_scores.topk(c["topk_group"], dim=-1)[1]
                mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
                choice = grouped.masked_fill(~mask.unsqueeze(-1), float("-inf")).view(t, e)
            idx = choice.topk(k, dim=-1)[1]
            weights = scores.gather(1, idx)
            if c["norm_topk_prob"]:
                weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        if c["routed_scaling_factor"] != 1:
            weights = weights * c["routed_scaling_factor"]
        return logits, probs, weights, idx


class MoEImplError(MambaTrainError, RuntimeError):
    """``moe_cfg.impl=grouped`` asked for where ``torch._grouped_mm`` cannot run."""


def _grouped_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.get_autocast_dtype("cuda") if (
        x.is_cuda and torch.is_autocast_enabled("cuda")) else x.dtype


def grouped_dtype_ok(x: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm`` takes this input's compute dtype: bf16 on CUDA (the Hopper
    kernel; fp32 on the GPU stays on the loop), fp32/bf16/fp16 on the CPU (no fp64)."""
    dtype = _grouped_dtype(x)
    if x.is_cuda:
        return dtype == torch.bfloat16
    return dtype in (torch.float32, torch.bfloat16, torch.float16)


def grouped_available(x: torch.Tensor, experts: Experts) -> bool:
    """Whether ``torch._grouped_mm`` can take these operands: a dtype it has
    (:func:`grouped_dtype_ok`), every row stride a multiple of 16 bytes (widths divisible by
    16 / element size)."""
    if not hasattr(torch, "_grouped_mm") or not grouped_dtype_ok(x):
        return False
    dtype = _grouped_dtype(x)
    per = 128 // torch.finfo(dtype).bits  # elements per 16 bytes
    dims = (experts.fc1.weight.shape[1], experts.fc1.weight.shape[2], experts.fc2.weight.shape[2])
    return all(d % per == 0 for d in dims)


def experts_loop(x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor,
                 experts: Experts) -> torch.Tensor:
    """Reference: per expert, the tokens routed to it (host-side index sets)."""
    out = torch.zeros_like(x)
    w1, w2 = experts.fc1.weight, experts.fc2.weight
    for e in range(w1.shape[0]):
        token, slot = torch.where(idx == e)
        if token.numel() == 0:
            continue
        h = experts.activation(F.linear(x[token], w1[e]))
        y = F.linear(h, w2[e]) * weights[token, slot, None].to(x.dtype)
        out.index_add_(0, token, y.to(out.dtype))
    return out


# each expert's rows start on a multiple of this: the backward's weight gradient reads the
# sorted rows transposed, where a group start is a 16-byte aligned column only at multiples of 8
# (bf16); torchtitan pads its token groups the same way
ROW_ALIGN = 8


def experts_grouped(x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor,
                    experts: Experts) -> torch.Tensor:
    """Assignments sorted by expert into groups padded to ``ROW_ALIGN`` rows, two grouped GEMMs,
    weighted and scattered back; every shape fixed by (tokens, k, experts), the group offsets
    computed on the device."""
    n_experts, k = experts.fc1.weight.shape[0], idx.shape[1]
    flat = idx.flatten()
    order = torch.argsort(flat, stable=True)
    token = order // k
    # not bincount: on CUDA it reads the largest index on the host to size its output
    counts = torch.zeros(n_experts, device=flat.device, dtype=torch.int64).index_add_(
        0, flat, torch.ones_like(flat))
    padded = (counts + ROW_ALIGN - 1) // ROW_ALIGN * ROW_ALIGN
    ends = torch.cumsum(padded, 0)
    expert = flat[order]  # sorted
    rank = torch.arange(flat.numel(), device=flat.device) - (torch.cumsum(counts, 0) - counts)[expert]
    slot = (ends - padded)[expert] + rank  # row of each sorted assignment in the padded buffer
    n_rows = flat.numel() + n_experts * (ROW_ALIGN - 1)
    offs = ends.to(torch.int32)
    dtype = _grouped_dtype(x)
    with torch.autocast(x.device.type, enabled=False):
        rows = torch.zeros(n_rows, x.shape[1], device=x.device, dtype=dtype).index_copy(
            0, slot, x[token].to(dtype))
        w1 = experts.fc1.weight.to(dtype).transpose(-2, -1)
        w2 = experts.fc2.weight.to(dtype).transpose(-2, -1)
        h = experts.activation(torch._grouped_mm(rows, w1, offs=offs))
        y = torch._grouped_mm(h, w2, offs=offs)[slot]
        y = y * weights.flatten()[order, None].to(y.dtype)
        out = torch.zeros(x.shape, device=x.device, dtype=y.dtype).index_add(0, token, y)
    return out.to(x.dtype)


class MoE(nn.Module):
    """The ``E`` sublayer: ``sum_k w_k expert_k(x) + shared(x)`` over the tokens of ``x``."""

    # set by mamba_train.parallel when each rank holds a slice of the sequence: the balancing
    # terms then sum their token statistics over the slices (models/state_passing.py)
    sequence_carry = None

    def __init__(self, d_model: int, cfg: dict[str, Any], down_multiplier: float = 1.0,
                 device=None, dtype=None):
        super().__init__()
        self.cfg = cfg
        self.down_multiplier = down_multiplier  # Granite's residual_multiplier
        n = cfg["n_experts"]
        self.router = Router(cfg, d_model, device=device, dtype=dtype)
        self.experts = Experts(n, d_model, cfg["d_expert"], cfg["act"], device=device, dtype=dtype)
        self.shared = make_mlp(d_model, cfg["d_shared"], act=cfg["act"], multiple_of=1,
                               device=device, dtype=dtype) if cfg["d_shared"] else None
        # statistics since the last read (moe_stats) and load since the last bias update
        stat = dict(device=device, dtype=torch.float32)
        self.register_buffer("load", torch.zeros(n, **stat), persistent=False)
        self.register_buffer("bias_load", torch.zeros(n, **stat), persistent=False)
        self.register_buffer("entropy_sum", torch.zeros((), **stat), persistent=False)
        self.register_buffer("tokens", torch.zeros((), **stat), persistent=False)
        self.aux_loss: torch.Tensor | None = None

    def reset_parameters(self) -> None:
        """Zero the statistics (a meta-device build materialises its buffers uninitialised)."""
        for buf in (self.load, self.bias_load, self.entropy_sum, self.tokens):
            buf.zero_()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        shape = hidden.shape
        x = hidden.reshape(-1, shape[-1])
        logits, probs, weights, idx = self.router(x)
        self._account(logits, probs, idx)
        impl = self.cfg["impl"]
        if impl == "grouped" and not grouped_dtype_ok(x):
            raise MoEImplError(
                f"model.moe_cfg.impl=grouped: torch._grouped_mm cannot compute in "
                f"{_grouped_dtype(x)} on {x.device.type} (bf16 on CUDA; fp32/bf16/fp16 on the "
                "CPU); set impl=auto (falls back to the loop) or impl=loop")
        if impl == "grouped" or (impl == "auto" and grouped_available(x, self.experts)):
            out = experts_grouped(x, weights, idx, self.experts)
        else:
            out = experts_loop(x, weights, idx, self.experts)
        if self.shared is not None:
            out = out + self.shared(x)
        if self.down_multiplier != 1:
            out = out * self.down_multiplier
        return out.view(shape)

    def _account(self, logits: torch.Tensor, probs: torch.Tensor, idx: torch.Tensor) -> None:
        n = self.cfg["n_experts"]
        counts = torch.zeros(n, device=idx.device, dtype=torch.float32).index_add_(
            0, idx.flatten(), torch.ones(idx.numel(), device=idx.device))
        with torch.no_grad():
            self.load += counts
            self.bias_load += counts
            p = probs.detach()
            self.entropy_sum += -(p * torch.log(p.clamp_min(1e-20))).sum()
            self.tokens += p.shape[0]
        c, loss = self.cfg, None
        if c["aux_loss_coef"] or c["z_loss_coef"]:
            tokens = counts.new_full((1,), idx.shape[0])
            prob_sum = probs.sum(0)
            z_sum = (torch.logsumexp(logits, -1).square().sum().view(1) if c["z_loss_coef"]
                     else tokens * 0)
            if self.sequence_carry is not None:  # a slice: the terms are the whole sequence's
                sums = self.sequence_carry.sum_over_slices(
                    "moe", torch.cat([counts, prob_sum.float(), z_sum.float(), tokens]))
                counts, prob_sum, z_sum, tokens = sums.split([n, n, 1, 1])
            if c["aux_loss_coef"]:  # counts / tokens sums to k
                loss = c["aux_loss_coef"] * n * ((counts / tokens) * (prob_sum / tokens)).sum()
            if c["z_loss_coef"]:
                z = c["z_loss_coef"] * (z_sum / tokens)[0]
                loss = z if loss is None else loss + z
        self.aux_loss = loss


def moe_layers(model: nn.Module) -> list[tuple[str, MoE]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoE)]


def aux_loss(model: nn.Module) -> torch.Tensor | None:
    """The balancing terms of the last forward, summed over the MoE layers (None if none)."""
    terms = [m.aux_loss for _, m in moe_layers(model) if m.aux_loss is not None]
    return torch.stack(terms).sum() if terms else None


@torch.no_grad()
def update_router_bias(model: nn.Module) -> None:
    """The auxiliary-loss-free balancing step: every correction bias moves by
    ``rate * sign(mean load - expert load)`` over the load since the last call (device-side)."""
    for _, m in moe_layers(model):
        bias, rate = m.router.e_score_correction_bias, m.cfg["bias_update_rate"]
        if bias is not None and rate:
            load = m.bias_load
            bias += rate * torch.sign(load.mean() - load)
        m.bias_load.zero_()


@torch.no_grad()
def moe_stats(model: nn.Module, reset: bool = True) -> dict[str, torch.Tensor]:
    """Per MoE layer since the last read: ``load`` (fraction of assignments per expert),
    ``imbalance`` (max/mean load) and ``router_entropy`` (mean over tokens, nats); device tensors
    (the caller syncs once, at log time)."""
    out: dict[str, torch.Tensor] = {}
    for name, m in moe_layers(model):
        load = m.load / m.load.sum().clamp_min(1)
        out[f"{name}.load"] = load
        out[f"{name}.imbalance"] = load.max() / load.mean().clamp_min(1e-20)
        out[f"{name}.router_entropy"] = m.entropy_sum / m.tokens.clamp_min(1)
        if reset:
            m.load.zero_(), m.entropy_sum.zero_(), m.tokens.zero_()
    return out


def check_moe_cfg(cfg: dict[str, Any], d_model: int) -> list[str]:
    """Problems of a filled-in ``moe_cfg`` (empty when it builds)."""
    bad = [f"model.moe_cfg has unknown keys {sorted(set(cfg) - set(MOE_DEFAULTS))}; valid: "
           f"{sorted(MOE_DEFAULTS)}"] if set(cfg) - set(MOE_DEFAULTS) else []
    n, k = cfg.get("n_experts"), cfg.get("top_k")
    if not isinstance(n, int) or n < 1 or not isinstance(k, int) or not 1 <= k <= n:
        bad.append(f"model.moe_cfg needs 1 <= top_k <= n_experts, got top_k={k}, n_experts={n}")
    if not isinstance(cfg.get("d_expert"), int) or cfg["d_expert"] <= 0:
        bad.append(f"model.moe_cfg.d_expert (each expert's hidden width) must be a positive "
                   f"integer, got {cfg.get('d_expert')!r}")
    for key, choices in (("router", ROUTERS), ("act", EXPERT_ACTS), ("impl", IMPLS)):
        if cfg.get(key) not in choices:
            bad.append(f"model.moe_cfg.{key} must be one of {choices}, got {cfg.get(key)!r}")
    g, tg = cfg.get("n_group"), cfg.get("topk_group")
    if isinstance(n, int) and (g < 1 or n % g or not 1 <= tg <= g):
        bad.append(f"model.moe_cfg: n_group={g} must divide n_experts={n} and 1 <= "
                   f"topk_group={tg} <= n_group")
    elif g > 1 and n // g < 2:
        bad.append(f"model.moe_cfg: grouped top-k ranks a group by its two best experts; "
                   f"n_experts/n_group = {n // g} < 2")
    elif g > 1 and cfg.get("router") != "sigmoid":
        bad.append("model.moe_cfg.n_group > 1 (grouped top-k) needs router=sigmoid")
    if cfg.get("score_correction_bias") and cfg.get("router") != "sigmoid":
        bad.append("model.moe_cfg.score_correction_bias needs router=sigmoid")
    if cfg.get("bias_update_rate") and not cfg.get("score_correction_bias"):
        bad.append("model.moe_cfg.bias_update_rate moves the correction bias: set "
                   "score_correction_bias=true")
    return bad
