"""Context parallelism by state passing: each rank of a group holds one contiguous slice of every
sequence, and the layers join the slices exactly (``models/state_passing.py`` has the maths).

Per Mamba layer and step, the ranks exchange:

* the conv halo -- the last ``d_conv - 1`` conv inputs -- with the next rank (point-to-point;
  the backward sends their gradient back);
* each rank's (final SSM state from zero, whole-slice decay), all-gathered over the group; every
  rank then runs the exclusive scan ``h_out = decay * h_in + final`` over the ranks before it
  (a few multiply-adds of states). The backward all-reduces the gradients of the gathered pairs
  and each rank keeps its own: the reverse scan, done by autograd through the forward scan;
* Mamba-3 also carries its RoPE angle the same way and hands on its last token's k and v.

Attention layers all-gather their keys and values (each rank keeps those up to its slice end);
mixture-of-experts layers with balancing terms all-reduce their per-expert token statistics.
Nothing depends on the number of heads, so any group size that divides the sequence works.

Every exchange goes through ``_all_gather``, ``_all_reduce`` or ``_shift`` below, which also
record it in any open ``parallel.tally.count_exchanges()`` (what is sent, measured).

``ContextParallel(group).install(model)`` sets the carry on every mixer and adds two hooks on the
model: before the forward, the slice's offset and the document numbers before it (one all-gather
of ``seq_idx``); after it, the loss becomes the mean over the whole sequence (below).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from mamba_train.models.state_passing import SequenceCarry, expand_decay
from mamba_train.parallel.tally import nbytes, record


def _all_gather(x: torch.Tensor, group, key: str, phase: str = "forward") -> list[torch.Tensor]:
    """Every rank's ``x`` (same shape), in rank order."""
    size = dist.get_world_size(group)
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.contiguous(), group=group)
    record(key, "all_gather", phase, nbytes(x), (size - 1) * nbytes(x))
    return parts


def _all_reduce(x: torch.Tensor, group, key: str, phase: str) -> None:
    """Sum ``x`` (contiguous) over the group in place."""
    dist.all_reduce(x, group=group)
    record(key, "all_reduce", phase, nbytes(x), nbytes(x))


class _AllGather(torch.autograd.Function):
    """Every rank's tensor (same shape), stacked on dim 0; the backward sums each rank's
    gradient over the group (an all-reduce: gloo has no reduce-scatter) and keeps its own."""

    @staticmethod
    def forward(ctx, x, group, key):
        ctx.group, ctx.key = group, key
        ctx.rank = dist.get_rank(group)
        return torch.stack(_all_gather(x, group, key))

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        _all_reduce(grad, ctx.group, ctx.key, "backward")
        return grad[ctx.rank], None, None


class _ExclusiveScan(torch.autograd.Function):
    """h_in = sum over ranks q before this one of (decay_{q+1} ... decay_{r-1}) * state_q: the
    state entering this rank's slice. Forward: all-gather the (state, decay) pairs, scan them.
    Backward: the reverse scan of dh_in over the same pairs gives every rank's share of each
    pair's gradient; an all-reduce sums the shares and each rank keeps its own. Every rank runs
    both collectives (also rank 0, whose h_in is zero), so they pair up."""

    @staticmethod
    def forward(ctx, state, decay, group, key):
        ctx.group, ctx.rank, ctx.key = group, dist.get_rank(group), key
        ctx.input_decay_shape = decay.shape
        decay = expand_decay(decay, state)
        states = _all_gather(state, group, key)
        decays = _all_gather(decay, group, key)
        h, before = torch.zeros_like(state), []
        for q in range(ctx.rank):
            before.append(h)
            h = decays[q] * h + states[q]
        ctx.decay_shape = decay.shape
        ctx.save_for_backward(*decays[: ctx.rank], *before)
        return h

    @staticmethod
    def backward(ctx, dh):
        size = dist.get_world_size(ctx.group)
        saved = ctx.saved_tensors
        decays, before = saved[: ctx.rank], saved[ctx.rank:]
        dstates = torch.zeros((size, *dh.shape), dtype=dh.dtype, device=dh.device)
        ddecays = torch.zeros((size, *ctx.decay_shape), dtype=dh.dtype, device=dh.device)
        g = dh
        for q in reversed(range(ctx.rank)):  # g: gradient of the state after rank q's step
            dstates[q] = g
            ddecays[q] = (g * before[q]).sum_to_size(ctx.decay_shape)
            g = g * decays[q]
        both = torch.cat([dstates.flatten(), ddecays.flatten()])  # one all-reduce
        _all_reduce(both, ctx.group, ctx.key, "backward")
        dstates, ddecays = both.split([dstates.numel(), ddecays.numel()])
        dstate = dstates.view(size, *dh.shape)[ctx.rank]
        ddecay = ddecays.view(size, *ctx.decay_shape)[ctx.rank].reshape(ctx.input_decay_shape)
        return dstate, ddecay, None, None


class _SumOverSlices(torch.autograd.Function):
    """The group's sum of x; the backward hands each rank the sum's gradient as it is (its x
    enters the sum once, and the data-parallel reduction adds the ranks' shares)."""

    @staticmethod
    def forward(ctx, x, group, key):
        total = x.detach().clone().contiguous()
        _all_reduce(total, group, key, "forward")
        return total

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


class _Halo(torch.autograd.Function):
    """Send x to the next rank, return the previous rank's x (zeros on the first); the backward
    sends the gradient the other way."""

    @staticmethod
    def forward(ctx, x, group, key):
        ctx.group, ctx.key = group, key
        return _shift(x.contiguous(), group, key, forward=True)

    @staticmethod
    def backward(ctx, grad):
        return _shift(grad.contiguous(), ctx.group, ctx.key, forward=False), None, None


def _shift(x: torch.Tensor, group, key: str, forward: bool) -> torch.Tensor:
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    src, dst = (rank - 1, rank + 1) if forward else (rank + 1, rank - 1)
    if x.device.type != "cpu" and dist.get_backend(group) == "gloo":
        # gloo's point-to-point takes host tensors only (its collectives stage device ones)
        return _shift(x.cpu(), group, key, forward).to(x.device)
    out = torch.zeros_like(x)
    ops = []
    if 0 <= dst < size:
        ops.append(dist.P2POp(dist.isend, x, group=group, group_peer=dst))
    if 0 <= src < size:
        ops.append(dist.P2POp(dist.irecv, out, group=group, group_peer=src))
    if ops:
        for req in dist.batch_isend_irecv(ops):
            req.wait()
    phase = "forward" if forward else "backward"
    if 0 <= dst < size:
        record(key, "send", phase, nbytes(x), 0)
    if 0 <= src < size:
        record(key, "recv", phase, 0, nbytes(out))
    return out


class ContextParallelCarry(SequenceCarry):
    """The ``SequenceCarry`` of one rank of a context-parallel group (``group``: its process
    group; the rank order in the group is the slice order)."""

    def __init__(self, group):
        super().__init__()
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)

    def begin(self, seqlen: int, seq_idx: torch.Tensor | None) -> None:
        """Per forward: this slice's offset and the document numbers of the slices before it."""
        self.offset = self.rank * seqlen
        self.prev_seq_idx = None
        if seq_idx is not None:
            parts = _all_gather(seq_idx, self.group, "seq_idx")
            if self.rank > 0:
                self.prev_seq_idx = torch.cat(parts[: self.rank], dim=1)

    def halo(self, key, tail):
        return _Halo.apply(tail, self.group, key)

    def carry(self, key, state, decay):
        h_in = _ExclusiveScan.apply(state, decay.to(state.dtype), self.group, key)
        return h_in.reshape(state.shape)

    def sum_over_slices(self, key, x):
        return _SumOverSlices.apply(x, self.group, key)

    def gather(self, key, x):
        full = _AllGather.apply(x, self.group, key)  # (size, b, L, ...)
        return torch.cat(list(full[: self.rank + 1]), dim=1)  # causal: later keys unused


class ContextParallel:
    """Installs context parallelism over ``group`` on a ``MambaLM``."""

    def __init__(self, group):
        self.group = group
        self.carry = ContextParallelCarry(group)
        self._handles: list = []

    @property
    def size(self) -> int:
        return self.carry.size

    @property
    def rank(self) -> int:
        return self.carry.rank

    def install(self, model: nn.Module) -> nn.Module:
        mixers = [m for m in model.modules() if hasattr(type(m), "sequence_carry")]
        for m in mixers:
            m.sequence_carry = self.carry
        self._handles = [
            model.register_forward_pre_hook(self._before, with_kwargs=True),
            model.register_forward_hook(self._after, with_kwargs=True),
        ]
        return model

    def remove(self, model: nn.Module) -> None:
        """Undo ``install`` (whole sequences again)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        for m in model.modules():
            if getattr(m, "sequence_carry", None) is self.carry:
                m.sequence_carry = None

    def slice(self, batch: dict) -> dict:
        """This rank's slice of every (batch, seqlen) tensor of a batch: input_ids, labels,
        seq_idx (each rank of the group got the same window from the loader)."""
        out = dict(batch)
        for key in ("input_ids", "labels", "seq_idx"):
            t = batch.get(key)
            if t is None:
                continue
            seqlen = t.shape[1]
            if seqlen % self.size:
                raise ValueError(f"a {seqlen}-token window does not split into "
                                 f"{self.size} equal slices: make data.seq_len a multiple of "
                                 "strategy.context_parallel_size")
            n = seqlen // self.size
            out[key] = t[:, self.rank * n:(self.rank + 1) * n]
        return out

    def _before(self, module, args, kwargs):
        input_ids = args[0] if args else kwargs["input_ids"]
        self.carry.begin(input_ids.shape[1], kwargs.get("seq_idx"))

    def _after(self, module, args, kwargs, output):
        """Loss over the whole sequence: its value is the group's mean over all valid tokens;
        its gradient is ``size * (this slice's loss sum) / (group's valid tokens)``, so that
        the gradient average over the ranks (data-parallel reduction) is the exact gradient of
        the whole-sequence mean. Mixture-of-experts balancing terms (``output.balance``) are
        already the whole sequence's on every rank (their statistics are summed over the
        group, ``models/moe.py``); only their gradient, this slice's share, is scaled."""
        labels = kwargs.get("labels")
        if getattr(output, "loss", None) is None or labels is None:
            return output
        balance = output.balance
        token_mean = output.loss if balance is None else output.loss - balance
        count = (labels != -100).sum().to(token_mean.dtype)
        local_sum = token_mean * count
        totals = torch.stack([local_sum.detach(), count])
        _all_reduce(totals, self.group, "loss", "forward")
        n = totals[1].clamp(min=1)
        scaled = local_sum * self.size / n
        loss = totals[0] / n + (scaled - scaled.detach())
        if balance is not None:
            loss = loss + balance.detach() + self.size * (balance - balance.detach())
        return output._replace(loss=loss)
