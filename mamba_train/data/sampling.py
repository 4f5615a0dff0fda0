"""Sampling maths of the training stream: pure integer functions, no I/O, no torch.

* :func:`mix64` -- a 64-bit integer hash (splitmix64 finaliser), the source of every seed below;
* :class:`FeistelPermutation` -- a seeded bijection of ``range(n)`` evaluated per index in O(1)
  memory, so an epoch's shuffle of any corpus size is never materialised;
* :class:`MixSchedule` -- deterministic weighted interleaving of several sources, with a closed
  form for "which source owns global sample ``i``", so resuming at sample 10**9 costs the same
  as at sample 0.

The datasets (:mod:`mamba_train.data.dataset`) compose them; this module changes only when the
order of samples is meant to change (which breaks exact resume of older checkpoints).
"""

from __future__ import annotations

import math
from typing import Sequence

M64 = (1 << 64) - 1


def mix64(x: int) -> int:
    """splitmix64 finaliser: a fast, well-mixed 64-bit hash of an integer."""
    x = (x + 0x9E3779B97F4A7C15) & M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M64
    return x ^ (x >> 31)


class FeistelPermutation:
    """A seeded bijection of ``range(n)`` computed per index in O(1) memory.

    A 6-round balanced Feistel network permutes ``[0, 4**h)`` (the smallest such range covering
    ``n``); indices that land outside ``range(n)`` are pushed through again ("cycle walking"),
    which keeps it a bijection of ``range(n)``; on average fewer than 4 passes.
    """

    ROUNDS = 6

    def __init__(self, n: int, key: int):
        if n < 1:
            raise ValueError(f"cannot permute an empty range (n={n})")
        self.n = n
        self.half = max(1, ((n - 1).bit_length() + 1) // 2)
        self.mask = (1 << self.half) - 1
        self.keys = [mix64((key & M64) ^ mix64(r)) for r in range(self.ROUNDS)]

    def __call__(self, i: int) -> int:
        if not 0 <= i < self.n:
            raise IndexError(f"{i} not in range({self.n})")
        x = i
        while True:
            left, right = x >> self.half, x & self.mask
            for k in self.keys:
                left, right = right, left ^ (mix64(right ^ k) & self.mask)
            x = (left << self.half) | right
            if x < self.n:
                return x


class MixSchedule:
    """Deterministic weighted interleaving of ``K`` sources (stride scheduling), O(1) per lookup.

    Source ``s`` has integer share ``a_s`` (its weight, normalised to 2**20) and a seeded phase
    ``p_s``; its ``n``-th sample fires at time ``(n * P + p_s) / a_s``. The global sample order
    is all firings sorted by (time, source). So every prefix of ``i`` samples holds
    ``i * w_s`` samples of each source (``w_s = a_s / sum(a)``) to within ``1 + (K - 2) * w_s``
    (one for two sources; each source's count rounds its own phase, and ``i`` sums all ``K``),
    and (the point of it) ``locate(i)`` is computed in closed form with exact integer
    arithmetic: resume at sample 10**9 costs the same as at sample 0, with no replay.
    """

    P = 1 << 20

    def __init__(self, weights: Sequence[float], seed: int = 0):
        weights = [float(w) for w in weights]
        if not weights or any(not (w > 0) or math.isinf(w) for w in weights):
            raise ValueError(f"mixture weights must be finite and > 0, got {weights}")
        total = sum(weights)
        self.shares = [max(1, round(w / total * self.P)) for w in weights]
        self.phases = [mix64(mix64(seed & M64) ^ s) % self.P for s in range(len(weights))]
        self.total_share = sum(self.shares)

    def __len__(self) -> int:
        return len(self.shares)

    def locate(self, i: int) -> tuple[int, int]:
        """Global sample ``i`` is sample number ``n`` of source ``s``: returns ``(s, n)``."""
        if len(self.shares) == 1:
            return 0, i
        k = len(self.shares)
        for s, a_s in enumerate(self.shares):
            guess = i * a_s // self.total_share
            lo, hi = max(0, guess - 2 * k - 2), guess + 2 * k + 2
            if lo and self._rank(s, lo) >= i:
                lo = 0
            if self._rank(s, hi) < i:
                hi = i
            while lo < hi:  # smallest n with rank(s, n) >= i
                mid = (lo + hi) // 2
                if self._rank(s, mid) >= i:
                    hi = mid
                else:
                    lo = mid + 1
            if self._rank(s, lo) == i:
                return s, lo
        raise AssertionError(f"no source owns sample {i}")  # unreachable: ranks are a bijection

    def _rank(self, s: int, n: int) -> int:
        """Position of firing ``(s, n)`` in the global order: how many firings precede it."""
        P, a_s, p_s = self.P, self.shares[s], self.phases[s]
        rank = n
        for r, (a_r, p_r) in enumerate(zip(self.shares, self.phases)):
            if r == s:
                continue
            y = (n * P + p_s) * a_r - p_r * a_s  # firing (r, m) precedes iff m*P*a_s < y (or ties)
            if y < 0:
                continue
            q, rem = divmod(y, P * a_s)
            rank += q + (rem > 0) + (rem == 0 and r < s)
        return rank
