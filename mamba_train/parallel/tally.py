"""Counting what context parallelism exchanges: inside ``with count_exchanges() as tally:`` every
collective and point-to-point transfer that ``context_parallel.py`` issues is appended to
``tally.events`` (what it carried, which call, forward or backward, bytes out and in).

Bytes are those of the tensors handed to the calls, per rank, not what a backend puts on the
wire: an all-gather sends this rank's tensor (``sent``) and gets the other ranks' (``received``,
``(size - 1) x`` as many); an all-reduce sends and gets its tensor once each (a ring implementation
moves ``2 (size - 1) / size`` times that each way); a point-to-point transfer is what it is. The
benchmark ``benchmarks/context_parallel_cost.py`` and its tests read the tally; training never
opens one, and with none open recording costs one list check per exchange.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Exchange:
    key: str  # what is carried: "conv", "ssm", "angle", "kv", "k", "v", "seq_idx", "loss"
    op: str  # "all_gather", "all_reduce", "send" or "recv"
    phase: str  # "forward" or "backward"
    sent: int  # bytes of this rank's data the call carries out of it
    received: int  # bytes of other ranks' data (or the reduced result) it brings in
    label: str | None = None  # ``ExchangeTally.label`` when the call was issued


class ExchangeTally:
    """The exchanges recorded while open. ``label`` is copied into each event (a caller sets it,
    e.g. to the layer that runs, to attribute the exchanges)."""

    def __init__(self):
        self.events: list[Exchange] = []
        self.label: str | None = None

    def select(self, key: str | None = None, phase: str | None = None,
               op: str | None = None) -> list[Exchange]:
        return [e for e in self.events if (key is None or e.key == key)
                and (phase is None or e.phase == phase) and (op is None or e.op == op)]

    def sent(self, **where) -> int:
        return sum(e.sent for e in self.select(**where))

    def received(self, **where) -> int:
        return sum(e.received for e in self.select(**where))


_OPEN: list[ExchangeTally] = []


@contextlib.contextmanager
def count_exchanges():
    tally = ExchangeTally()
    _OPEN.append(tally)
    try:
        yield tally
    finally:
        _OPEN.remove(tally)


def record(key: str, op: str, phase: str, sent: int, received: int) -> None:
    for tally in _OPEN:
        tally.events.append(Exchange(key, op, phase, int(sent), int(received), tally.label))


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()
