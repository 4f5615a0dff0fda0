"""Running a mixer on one slice of a longer sequence: what enters the slice from before it.

A Mamba mixer over tokens [offset, offset + L) of a sequence needs three things from the tokens
before its slice, and nothing else:

* the **conv halo**: the last ``d_conv - 1`` inputs of the depthwise causal convolution;
* the **SSM state** entering the slice. The scan is linear in it, so each slice runs from a zero
  state, reports (final state from zero, whole-slice decay), and the incoming state comes from an
  exclusive scan of those pairs over the slices before it: ``h_out = decay * h_in + final``;
  the slice then adds the incoming state's exact contribution to its outputs;
* for attention, the keys and values of the tokens before it (and their document numbers);
* for a mixture-of-experts layer's balancing terms, sums over every token of the sequence.

``SequenceCarry`` is that interface. This base class is a slice at the start of a sequence
(nothing enters); ``StateCarry`` carries states between slices run one after another in one
process (the kernels' ``initial_states`` / ``return_final_states``); the distributed one, one
slice per rank, is ``mamba_train.parallel.context_parallel``. Nothing here imports
``torch.distributed``.

The mixers take ``carry=`` in their forward, or read the ``sequence_carry`` attribute that
``mamba_train.parallel`` sets on them for a whole model. Keys name what is exchanged ("conv",
"ssm", "angle", "kv", "k", "v"); one carry object serves one mixer's calls in order.
"""

from __future__ import annotations

import torch

from mamba_train.errors import MambaTrainError


class SliceError(MambaTrainError, ValueError):
    """A slice too short for the state it must hand on."""


class SequenceCarry:
    """A slice that starts its sequence: no tokens before it, zero states enter.

    offset: the global position of the slice's first token (rotary positions of attention).
    prev_seq_idx: (batch, offset) document numbers of the tokens before the slice, or None.
    """

    def __init__(self, offset: int = 0, prev_seq_idx: torch.Tensor | None = None):
        self.offset = int(offset)
        self.prev_seq_idx = prev_seq_idx

    # ---------------------------------------------------------------- document boundaries
    def doc_starts(self, seq_idx: torch.Tensor | None, seqlen: int) -> torch.Tensor | None:
        """(batch, seqlen) bool, True where a document starts -- also at position 0 when the
        token before the slice belongs to another document. None without seq_idx."""
        # imported here: the reference mixers import this module while their package initialises
        from mamba_train.models.reference.common import _doc_start_mask

        start = _doc_start_mask(seq_idx, seqlen)
        if start is None:
            return None
        if self.prev_seq_idx is not None and self.prev_seq_idx.shape[-1]:
            start[:, 0] = seq_idx[:, 0] != self.prev_seq_idx[:, -1]
        return start

    def seq_idx_with_prefix(self, seq_idx: torch.Tensor, k: int) -> torch.Tensor:
        """seq_idx with the document numbers of the k tokens before the slice in front (a number
        no document has where there are none: what enters from there is zero anyway)."""
        prev = self.prev_seq_idx
        have = 0 if prev is None else min(k, prev.shape[-1])
        pad = seq_idx[:, :1].expand(-1, k - have) - 1
        parts = [pad] + ([prev[:, prev.shape[-1] - have:]] if have else []) + [seq_idx]
        return torch.cat(parts, dim=1)

    # ---------------------------------------------------------------- exchanges
    def halo(self, key: str, tail: torch.Tensor) -> torch.Tensor:
        """The previous slice's ``tail`` (same shape); zeros at the sequence start."""
        return torch.zeros_like(tail)

    def carry(self, key: str, state: torch.Tensor, decay: torch.Tensor) -> torch.Tensor:
        """The state entering this slice, given this slice's final state from zero and its
        whole-slice decay (``decay`` broadcasts against ``state`` over its leading dims)."""
        return torch.zeros_like(state)

    def gather(self, key: str, x: torch.Tensor) -> torch.Tensor:
        """x (batch, L, ...) of every token from the sequence start to this slice's end."""
        return x

    def sum_over_slices(self, key: str, x: torch.Tensor) -> torch.Tensor:
        """``x`` summed over the slices of the sequence (a statistic of all its tokens, e.g. a
        router's expert counts); the gradient reaching this slice's ``x`` is the sum's own,
        unsummed: each slice answers for its tokens' part. One slice: ``x`` itself."""
        return x

    def seq_idx_up_to_here(self, seq_idx: torch.Tensor) -> torch.Tensor:
        """Document numbers of every token from the sequence start to this slice's end."""
        if self.prev_seq_idx is None:
            return seq_idx
        return torch.cat([self.prev_seq_idx, seq_idx], dim=1)


def expand_decay(decay: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """A decay over the leading dims of ``state``, with trailing dims of size 1 to broadcast."""
    return decay.reshape(decay.shape + (1,) * (state.dim() - decay.dim()))


class StateCarry(SequenceCarry):
    """Slices run one after another in one process: ``incoming`` holds what the previous slice
    left (empty for the first slice), ``outgoing`` collects what this slice leaves for the next
    (the final conv window, SSM state, angle, last token, keys and values)."""

    def __init__(self, incoming: dict | None = None, offset: int = 0,
                 prev_seq_idx: torch.Tensor | None = None):
        super().__init__(offset, prev_seq_idx)
        self.incoming = dict(incoming or {})
        self.outgoing: dict[str, torch.Tensor] = {}

    def halo(self, key, tail):
        self.outgoing[key] = tail
        return self.incoming.get(key, torch.zeros_like(tail))

    def carry(self, key, state, decay):
        h_in = self.incoming.get(key, torch.zeros_like(state))
        self.outgoing[key] = expand_decay(decay, state) * h_in + state
        return h_in

    def gather(self, key, x):
        prev = self.incoming.get(key)
        full = x if prev is None else torch.cat([prev, x], dim=1)
        self.outgoing[key] = full
        return full

    def next(self, seq_idx: torch.Tensor | None, seqlen: int) -> "StateCarry":
        """The carry for the slice after this one (this one covered ``seqlen`` tokens)."""
        prev = None if seq_idx is None else self.seq_idx_up_to_here(seq_idx)
        return StateCarry(self.outgoing, self.offset + seqlen, prev)


def carried_causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          seq_idx: torch.Tensor | None, activation: str | None,
                          carry: SequenceCarry | None, conv=None) -> torch.Tensor:
    """``causal_conv1d`` over (batch, dim, L), preceded by the previous slice's last
    ``width - 1`` inputs (the halo) when ``carry`` is given: exact, document masks included.
    ``conv``: the convolution, called as ``conv(x, weight, bias, seq_idx=, activation=)`` (default
    the reference's); the halo-extended input it gets is channel-last (stride 1 over channels),
    the layout causal-conv1d's kernel needs for ``seq_idx``."""
    if conv is None:
        # imported here: the reference mixers import this module while their package initialises
        from mamba_train.models.reference.common import causal_conv1d as conv

    k = weight.shape[-1] - 1
    if carry is None or k == 0:
        return conv(x, weight, bias, seq_idx=seq_idx, activation=activation)
    if x.shape[-1] < k:
        raise SliceError(f"a slice of {x.shape[-1]} tokens is shorter than the conv window's "
                         f"{k} previous inputs; use longer slices (fewer context-parallel ranks "
                         "or a longer data.seq_len)")
    halo = carry.halo("conv", x[..., -k:])
    ext_seq = None if seq_idx is None else carry.seq_idx_with_prefix(seq_idx, k)
    ext = torch.cat([halo.transpose(1, 2), x.transpose(1, 2)], dim=1).transpose(1, 2)
    out = conv(ext, weight, bias, seq_idx=ext_seq, activation=activation)
    return out[..., k:]
