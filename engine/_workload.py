"""Seeded workloads for the stress harness: which accounts, how much, and when to retry.

Every choice comes from a `random.Random` seeded from `--seed` and the client's
number, so a run (and a failure) can be replayed exactly.
"""

from __future__ import annotations

import bisect
import itertools
import random
from dataclasses import dataclass

MIXES = ("uniform", "hotspot", "zipf")
HOT_SHARE_ACCOUNTS = 0.10
"""hotspot: this share of the accounts..."""
HOT_SHARE_TRAFFIC = 0.90
"""...takes this share of the transfers."""
ZIPF_EXPONENT = 1.1


RESOLUTIONS = ("post", "post-part", "void", "expire", "open")
"""What a client does with a pending transfer it made: post all of it, post part, void it,
let it expire (a 1 s timeout), or leave it open (no timeout)."""
RESOLUTION_WEIGHTS = (35, 20, 20, 15, 10)
RETRY_RATE_DEFAULT = 0.02
"""The share of transfers `tally stress` sends again with the same id, unless told."""
RETRIES_DIFFERING = 0.25
"""The share of retries that differ from their original (`Op.differs`)."""
PENDING_EXPIRY_S = 1
"""The timeout of a pending transfer the client lets expire."""
PENDING_TIMEOUT_S = 3600
"""The timeout of a pending transfer the client posts or voids (a deadline it never meets)."""


@dataclass(frozen=True, slots=True)
class Op:
    transfer_id: str
    source: str
    destination: str
    amount: int
    retry: bool
    """True: a resubmission of an earlier id, with the same fields unless `differs`."""
    kind: str = "single"
    """single; pending (then resolved as `resolution` says); linked (the chain of `legs`)."""
    resolution: str = ""
    """A pending transfer's fate, one of `RESOLUTIONS`."""
    legs: tuple[tuple[str, str, str, int], ...] = ()
    """A linked chain's transfers: (id, source, destination, amount), each leg's source the
    destination of the one before."""
    differs: bool = False
    """A retry whose amount is not its original's: the ledger must refuse it `IdempotencyConflict`."""


class Picker:
    """Chooses (source, destination) pairs of distinct accounts by mix."""

    def __init__(self, names: list[str], mix: str) -> None:
        if mix not in MIXES:
            raise ValueError(f"unknown mix {mix!r}: choose one of {', '.join(MIXES)}")
        if len(names) < 2:
            raise ValueError("a workload needs at least 2 accounts")
        self._names = names
        self._mix = mix
        self._hot = max(2, int(len(names) * HOT_SHARE_ACCOUNTS))
        weights = [1.0 / (rank**ZIPF_EXPONENT) for rank in range(1, len(names) + 1)]
        self._cumulative = list(itertools.accumulate(weights))

    def _one(self, rng: random.Random) -> int:
        if self._mix == "uniform":
            return rng.randrange(len(self._names))
        if self._mix == "hotspot":
            if rng.random() < HOT_SHARE_TRAFFIC:
                return rng.randrange(self._hot)
            return rng.randrange(len(self._names))
        return bisect.bisect_left(self._cumulative, rng.random() * self._cumulative[-1])

    def pair(self, rng: random.Random) -> tuple[str, str]:
        source = self._one(rng)
        destination = self._one(rng)
        while destination == source:
            destination = self._one(rng)
        return self._names[source], self._names[destination]


class ClientWorkload:
    """The ops one client sends, in order, from its own seeded generator."""

    def __init__(self, picker: Picker, *, tag: str, client: int, seed: int, amount_max: int, retry_rate: float,
                 pending_rate: float = 0.0, linked_rate: float = 0.0) -> None:
        self._picker = picker
        self._rng = random.Random(seed * 1_000_003 + client)
        self._prefix = f"{tag}-c{client}-"
        self._amount_max = amount_max
        self._retry_rate = retry_rate
        self._pending_rate = pending_rate
        self._linked_rate = linked_rate
        self._sent: list[Op] = []
        self._count = 0

    def next(self) -> Op:
        rng = self._rng
        if self._sent and rng.random() < self._retry_rate:
            earlier = self._sent[rng.randrange(len(self._sent))]
            differs = rng.random() < RETRIES_DIFFERING
            amount = earlier.amount if not differs else earlier.amount - 1 if earlier.amount > 1 else 2
            return Op(earlier.transfer_id, earlier.source, earlier.destination, amount, True, differs=differs)
        source, destination = self._picker.pair(rng)
        tid, amount = f"{self._prefix}{self._count}", rng.randint(1, self._amount_max)
        self._count += 1
        kind = rng.random()
        if kind < self._pending_rate:
            resolution = rng.choices(RESOLUTIONS, RESOLUTION_WEIGHTS)[0]
            return Op(tid, source, destination, amount, False, "pending", resolution)
        if kind < self._pending_rate + self._linked_rate:  # source -> destination -> onward (-> onward...)
            legs = [(f"{tid}-0", source, destination, amount)]
            for leg in range(1, rng.randint(2, 3)):
                onward = self._picker.pair(rng)[0]
                while onward == legs[-1][2]:
                    onward = self._picker.pair(rng)[0]
                legs.append((f"{tid}-{leg}", legs[-1][2], onward, rng.randint(1, self._amount_max)))
            return Op(tid, source, destination, amount, False, "linked", legs=tuple(legs))
        op = Op(tid, source, destination, amount, False)
        if len(self._sent) < 4096:
            self._sent.append(op)
        return op
