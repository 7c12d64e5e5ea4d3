"""What the sharded-ledger tests share: one Ray per test module, and a look at the books."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from engine import ShardedLedger

SHARDS = 2


@contextmanager
def ray_for_module() -> Iterator[None]:
    """A local Ray on loopback for a test module (its ledgers join it, and leave it running)."""
    import ray

    from engine import _ray

    started, _ = _ray.join(None)
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def accounts_on(ledger: ShardedLedger, prefix: str, count: int, shard: int, balance: int = 0,
                currency: str = "USD") -> list[str]:
    """`count` new accounts on `shard` (placement keys chosen to land there), each funded with
    `balance` from a bank on that shard (`{prefix}bank`, no limit)."""
    bank = f"{prefix}bank-{shard}"
    key = next(f"{prefix}key-{shard}-{i}" for i in range(10_000) if _shard_of(ledger, f"{prefix}key-{shard}-{i}") == shard)
    ledger.create_account(bank, currency=currency, overdraft_limit=None, placement=key)
    names = [f"{prefix}{shard}-{i}" for i in range(count)]
    for name in names:
        ledger.create_account(name, currency=currency, placement=key)
        if balance:
            ledger.transfer(f"fund-{name}", source=bank, destination=name, amount=balance)
    return names


def _shard_of(ledger: ShardedLedger, key: str) -> int:
    from engine._placement import shard_of

    return shard_of(key, ledger.shards)


def books(ledger: ShardedLedger) -> tuple[list[int], dict[tuple[int, int, str], int], int, int]:
    """(each shard's sum of posted balances, the net position of each pair of shards' four
    clearing accounts (posted, by the lower shard, the higher, the currency: 0 once nothing is
    in doubt or in flight, netted or not), the sum of incoming on clearing accounts (what is in
    doubt or in flight), the users' total posted)."""
    sums, pairs, users, in_flight = [], {}, 0, 0
    for shard in range(ledger.shards):
        balances = ledger.shard_balances(shard)
        sums.append(sum(b.posted for b in balances.values()))
        for name, balance in balances.items():
            if name.startswith("\x1fclearing-to-"):
                peer, _, currency = name[len("\x1fclearing-to-"):].partition("\x1f")
                key = (min(shard, int(peer)), max(shard, int(peer)), currency)
                pairs[key] = pairs.get(key, 0) + balance.posted
                in_flight += balance.incoming
            elif name.startswith("\x1fclearing-from-"):
                peer, _, currency = name[len("\x1fclearing-from-"):].partition("\x1f")
                key = (min(shard, int(peer)), max(shard, int(peer)), currency)
                pairs[key] = pairs.get(key, 0) + balance.posted
            elif not name.startswith("\x1f"):
                users += balance.posted
    return sums, pairs, in_flight, users


def poll(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Wait (polling, at most `timeout_s`) until `condition()`; AssertionError naming `what`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def shard_dirs(path: Path, shards: int = SHARDS) -> list[Path]:
    return [path / f"shard-{i}" for i in range(shards)]


class ClockOffsetBy:
    """The wall clock plus the offset in seconds the file `offset` holds: every shard's process
    reads the same (each has its own copy of the clock)."""

    def __init__(self, offset: Path) -> None:
        self.offset = offset

    def __call__(self) -> int:
        return time.time_ns() + int(self.offset.read_text()) * 10**9


class ClockFailingIn:
    """A clock of one's own (the wall clock's readings) that gives a bad reading in the shard
    process whose pid the file `flag` names (a shard's clock runs in its own process)."""

    def __init__(self, flag: Path) -> None:
        self.flag = flag

    def __call__(self) -> int:
        if self.flag.exists() and self.flag.read_text() == str(os.getpid()):
            return -1
        return time.time_ns()
