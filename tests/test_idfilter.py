"""The transfer-id Bloom filter: an id once added is never reported new, even by the call
that makes the filter grow (else a retry of a durable transfer would skip the index
lookup and run again)."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from coordinator._claims import Claims, id_hash, key_hash
from coordinator._idfilter import IdFilter
from coordinator._limits import CLAIM_STRIPES
from coordinator._records import id_key
from engine import Balance, IdempotencyConflict, Ledger, Transfer, TransferRequest
from journal import Journal

WAIT_S = 10.0


def test_check_and_add_remembers_an_id_when_it_makes_the_filter_grow() -> None:
    rng = random.Random(5)
    ids = list({rng.getrandbits(58) for _ in range(20_000)})
    first_layer = len(ids[:16_384])
    seen = IdFilter()
    for h in ids[:first_layer]:  # exactly fills the first layer
        seen.check_and_add(h)
    assert seen.might_contain(ids[0])
    assert seen.check_and_add(ids[0]), "an id already added must never be reported as new"


def test_a_retry_of_a_durable_transfer_when_its_id_filter_grows_returns_the_original(ledger_path: Path) -> None:
    with Ledger.open(ledger_path) as ledger:
        claims = ledger._coordinator.claims
        assert claims.wait_warm(WAIT_S)
        ledger.create_account("bank", currency="USD", overdraft_limit=None)
        ledger.create_account("alice", currency="USD")
        original = ledger.transfer("t-1", source="bank", destination="alice", amount=10)
        # Stand-in for the ~16,000 other ids this stripe saw before: fill its first layer.
        h = id_hash("t-1")
        stripe = claims._filters[h & (CLAIM_STRIPES - 1)]
        rng = random.Random(7)
        while len(stripe) < stripe._capacity:
            stripe.add(rng.getrandbits(58))
        retried = ledger.transfer("t-1", source="bank", destination="alice", amount=10)
        assert retried == original
        assert ledger.balance("alice") == Balance(10, 0, 10)


def test_every_id_added_is_remembered_and_few_unseen_ids_look_seen() -> None:
    rng = random.Random(11)
    added = [rng.getrandbits(58) for _ in range(60_000)]  # fills three layers
    seen = IdFilter()
    for h in added:
        seen.add(h)
    assert all(seen.might_contain(h) for h in added)
    unseen = [rng.getrandbits(58) for _ in range(60_000)]
    false_positives = sum(seen.might_contain(h) for h in unseen)
    assert false_positives < len(unseen) * 0.02, false_positives  # each one costs an index read


@pytest.mark.parametrize("expected", [0, 50_000, 100_000])
def test_add_all_remembers_every_id_across_every_layer_it_fills(expected: int) -> None:
    """The warm-up's bulk add grows layers as `add` does (with no size given, 60,000 ids
    fill three), a filter sized for what it will hold makes fewer, every id added is
    remembered, and within one layer it sets exactly the bits one `add` each would."""
    rng = random.Random(13)
    added = [rng.getrandbits(58) - (1 << 57) for _ in range(60_000)]  # negative hashes too
    in_bulk = IdFilter(expected)
    for first in range(0, len(added), 7_000):  # in parts, as the warm-up hands them over
        in_bulk.add_all(added[first : first + 7_000])
    assert len(in_bulk) == len(added)
    assert len(in_bulk._layers) == {0: 3, 50_000: 2, 100_000: 1}[expected]
    assert all(in_bulk.might_contain(h) for h in added)
    unseen = [rng.getrandbits(58) for _ in range(60_000)]
    assert sum(in_bulk.might_contain(h) for h in unseen) < len(unseen) * 0.02
    if expected == 100_000:
        one_by_one = IdFilter(expected)
        for h in added:
            one_by_one.add(h)
        assert bytes(in_bulk._layers[0]) == bytes(one_by_one._layers[0])
    assert all(in_bulk.check_and_add(h) for h in added)


def test_a_reopened_ledger_sizes_its_filters_for_the_ids_it_holds(ledger_path: Path) -> None:
    with Ledger.open(ledger_path) as ledger:
        ledger.create_account("bank", currency="USD", overdraft_limit=None)
        ledger.create_account("alice", currency="USD")
        ledger.transfer_many([TransferRequest(f"t-{n}", "bank", "alice", 1) for n in range(3_000)])
    with Ledger.open(ledger_path) as reopened:
        claims = reopened._coordinator.claims
        assert claims.wait_warm(WAIT_S)
        assert all(len(stripe._layers) == 1 for stripe in claims._filters)
        assert sum(len(stripe) for stripe in claims._filters) == 3_000
        assert reopened.transfer("t-7", source="bank", destination="alice", amount=1).lsn < 3_100  # a retry
        with pytest.raises(IdempotencyConflict):
            reopened.transfer("t-7", source="bank", destination="alice", amount=2)  # differs


def test_ids_hashed_as_the_claims_hash_them_negative_ones_included_are_remembered() -> None:
    hashes = [id_hash(f"t-{n}") >> 6 for n in range(40_000)]
    assert any(h < 0 for h in hashes) and any(h > 0 for h in hashes)
    seen = IdFilter()
    assert sum(seen.check_and_add(h) for h in hashes) < len(hashes) // 100
    assert all(seen.check_and_add(h) for h in hashes)


def test_the_warm_up_hashes_an_index_key_as_a_claim_hashes_its_id() -> None:
    """The warm-up reads ids as index keys (UTF-8, or a digest past LMDB's key limit); a
    claim hashes the id itself. Both must land on the same filter bits, or a retry after
    reopening would look new."""
    ids = ["t-1", "x" * 128, "é" * 128, "\U0001f4b6" * 100, "\U0001f4b6" * 101, "\U0001f4b6" * 128]
    assert id_key(ids[-1])[:1] == b"\xff" and id_key(ids[3])[:1] != b"\xff"  # both kinds of key
    for tid in ids:
        assert key_hash(id_key(tid)) == id_hash(tid), tid


def test_the_warm_up_holds_no_snapshot_while_it_waits_for_a_stripe_a_claim_holds(
    ledger_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cycle the review found: the warm-up waited for a stripe lock with a read transaction
    open; a batch's claim held the stripe locks and, asking the index, waited for a map grow;
    the grow waited for every reader to close. Each waited on the next, for good."""
    with Ledger.open(ledger_path) as ledger:
        ledger.create_account("bank", currency="USD", overdraft_limit=None)
        ledger.create_account("alice", currency="USD")
        ledger.transfer_many([TransferRequest(f"old-{n}", "bank", "alice", 1) for n in range(100)])

    parked, go, asking, grow_waits = (threading.Event() for _ in range(4))
    index_keys, lookup = Journal.index_keys, Claims.lookup

    def slow_keys(self: Journal, name: str, txn: Any, after: bytes | None = None) -> Iterator[bytes]:
        for n, key in enumerate(index_keys(self, name, txn, after)):
            if n == 1:  # a long warm-up, in effect: a snapshot stays open until `go`
                parked.set()
                go.wait(WAIT_S)
            yield key

    def slow_lookup(self: Claims, tid: str, txn: Any = None) -> Any:
        if txn is None and not asking.is_set():  # the batch's first index read, its stripes held
            asking.set()
            grow_waits.wait(WAIT_S)
        return lookup(self, tid, txn)

    monkeypatch.setattr(Journal, "index_keys", slow_keys)
    monkeypatch.setattr(Claims, "lookup", slow_lookup)
    with Ledger.open(ledger_path, timeout_s=WAIT_S) as ledger:
        assert parked.wait(WAIT_S)
        results: list[Any] = []
        batch = threading.Thread(target=lambda: results.extend(
            ledger.transfer_many([TransferRequest(f"new-{n}", "bank", "alice", 1) for n in range(3)])))
        batch.start()
        assert asking.wait(WAIT_S)
        store = ledger._journal._store
        grow = threading.Thread(target=store.grow)  # what the writer does when the map is full
        grow.start()
        deadline = time.monotonic() + WAIT_S
        while not store._growing and time.monotonic() < deadline:  # the grow waits for the readers
            time.sleep(0.001)
        assert store._growing
        grow_waits.set()
        go.set()
        batch.join(WAIT_S)
        grow.join(WAIT_S)
        assert not batch.is_alive() and not grow.is_alive(), "the warm-up, a claim and a map grow deadlocked"
        assert [type(result) for result in results] == [Transfer] * 3
        assert ledger._coordinator.claims.wait_warm(WAIT_S)
        assert ledger.balance("alice") == Balance(103, 0, 103)


def test_the_warm_up_loads_every_journaled_id_across_chunks(ledger_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import coordinator._claims

    with Ledger.open(ledger_path) as ledger:
        ledger.create_account("bank", currency="USD", overdraft_limit=None)
        ledger.create_account("alice", currency="USD")
        ids = [f"t-{n}" for n in range(50)] + ["é" * 128, "\U0001f4b6" * 128]  # a raw and a digest key
        ledger.transfer_many([TransferRequest(tid, "bank", "alice", 1) for tid in ids])
    monkeypatch.setattr(coordinator._claims, "INDEX_KEYS_PER_SNAPSHOT", 7)  # 8 snapshots, the last one short
    with Ledger.open(ledger_path) as ledger:
        claims = ledger._coordinator.claims
        assert claims.wait_warm(WAIT_S)
        for tid in ids:
            h = id_hash(tid)
            assert claims._filters[h & (CLAIM_STRIPES - 1)].might_contain(h >> 6), tid
