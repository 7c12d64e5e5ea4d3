"""Closing a `ShardedLedger` that started Ray while calls are under way in other threads
(engine._sharded, engine._ray): each such call fails typed, and none starts Ray again. No
module-wide Ray here: each test's ledger starts its own, so its close shuts Ray down.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from engine import LedgerClosed, ShardedLedger, TransferRequest
from engine._crossing import Router
from tests.sharded_support import accounts_on

pytestmark = pytest.mark.timeout(120)


def _held(monkeypatch: pytest.MonkeyPatch, name: str) -> tuple[threading.Event, threading.Event]:
    """Router method `name` made to wait, once it is called, until released."""
    entered, release = threading.Event(), threading.Event()
    method = getattr(Router, name)

    def waiting(router: Router, *args: Any, **kwargs: Any) -> Any:
        entered.set()
        release.wait(60)
        return method(router, *args, **kwargs)

    monkeypatch.setattr(Router, name, waiting)
    return entered, release


def _in_thread(call: Callable[[], object]) -> tuple[threading.Thread, list[object]]:
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(call())
        except BaseException as error:  # whatever it raises is what the test looks at
            outcome.append(error)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


@pytest.mark.parametrize("held", ["call", "_cross"])
def test_a_call_under_way_when_the_ledger_that_started_ray_closes_is_ledger_closed_and_starts_no_ray(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, held: str) -> None:
    """A read between finding its shard and asking it, or a cross-shard transfer between its
    prepare and its credit, still under way when the close shut Ray down: Ray's next
    `.remote()` would start a new local Ray (its default `ray.init()`, seconds, left running)
    and fail with a bare `Exception`; it is `LedgerClosed`, and no Ray runs after."""
    import ray

    assert not ray.is_initialized(), "another test left Ray running"
    ledger = ShardedLedger.open(tmp_path / "books", shards=2)
    try:
        assert ledger._started_ray
        [left] = accounts_on(ledger, "l", 1, shard=0, balance=10)
        [right] = accounts_on(ledger, "r", 1, shard=1)
        entered, release = _held(monkeypatch, held)
        call: Callable[[], object] = (lambda: ledger.balance(left)) if held == "call" else (
            lambda: ledger.transfer_many([TransferRequest("T", left, right, 5)]))
        thread, outcome = _in_thread(call)
        assert entered.wait(60)
        ledger.close()
        assert not ray.is_initialized()
        release.set()
        thread.join(60)
        assert not thread.is_alive()
        assert isinstance(outcome[0], LedgerClosed), outcome
        assert not ray.is_initialized(), "a call under way at the close started Ray again"
    finally:
        monkeypatch.undo()
        ledger.close()
        if ray.is_initialized():
            ray.shutdown()
    reopened = ShardedLedger.open(tmp_path / "books", shards=2)  # what the transfer left in doubt: resolved
    try:
        assert reopened.balance(left).available == 10 and reopened.get_transfer("T") is None
    finally:
        reopened.close()
