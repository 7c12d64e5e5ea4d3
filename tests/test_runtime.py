"""Pooled actors on a bounded dispatcher, and activation/passivation of account actors."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pykka
import pytest
from engine import Balance, InsufficientFunds, Ledger
from engine._runtime import ActorDeadError, Dispatcher, PooledActor

WAIT_S = 10.0
PREFIX = "tally-dispatcher"


def dispatcher_threads() -> int:
    return sum(1 for thread in threading.enumerate() if thread.name.startswith(PREFIX))


@pytest.fixture
def dispatcher() -> Iterator[Dispatcher]:
    pool = Dispatcher(2)
    try:
        yield pool
    finally:
        pool.stop()


class Log:
    """What a `Recorder` saw, kept outside the actor so the test can read it."""

    def __init__(self, expected: int = 0) -> None:
        self.seen: list[Any] = []
        self.threads: set[str] = set()
        self.overlaps = 0
        self.stopped_hooks = 0
        self.expected = expected
        self.all_seen = threading.Event()


class Recorder(PooledActor):
    """Logs every message, notices any overlap of two turns, and signals once it has `expected`."""

    def __init__(self, log: Log) -> None:
        super().__init__()
        self._log = log
        self._busy = threading.Lock()

    def on_receive(self, message: Any) -> Any:
        log = self._log
        if not self._busy.acquire(blocking=False):
            log.overlaps += 1
            return None
        try:
            if isinstance(message, tuple) and message[0] == "block":
                message[1].set()  # entered
                assert message[2].wait(WAIT_S)  # released
            elif message == "fail":
                raise ValueError("the handler failed on purpose")
            log.seen.append(message)
            log.threads.add(threading.current_thread().name)
            if len(log.seen) == log.expected:
                log.all_seen.set()
            return ("echo", message)
        finally:
            self._busy.release()

    def on_stop(self) -> None:
        self._log.stopped_hooks += 1


def block(ref: pykka.ActorRef[Any]) -> threading.Event:
    """Park the actor inside a handler; set the returned event to let it go."""
    entered, release = threading.Event(), threading.Event()
    ref.tell(("block", entered, release))
    assert entered.wait(WAIT_S)
    return release


# --- one actor, many senders -----------------------------------------------------


def test_messages_from_many_threads_are_handled_one_at_a_time_in_each_senders_order(
    dispatcher: Dispatcher,
) -> None:
    senders, per_sender = 8, 500
    log = Log(expected=senders * per_sender)
    ref = Recorder.spawn(dispatcher, log)
    start = threading.Barrier(senders)

    def send(sender: int) -> None:
        start.wait(WAIT_S)
        for n in range(per_sender):
            if n % 2:
                ref.tell((sender, n))
            else:
                ref.actor_inbox.put_inline((sender, n))  # type: ignore[attr-defined]

    threads = [threading.Thread(target=send, args=(sender,)) for sender in range(senders)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT_S)
    assert log.all_seen.wait(WAIT_S)
    assert log.overlaps == 0
    for sender in range(senders):
        assert [n for s, n in log.seen if s == sender] == list(range(per_sender))
    assert len(log.seen) == senders * per_sender


def test_a_message_put_inline_to_an_idle_actor_runs_on_the_sending_thread(dispatcher: Dispatcher) -> None:
    log = Log(expected=2)
    ref = Recorder.spawn(dispatcher, log)
    assert ref.ask("ready", timeout=WAIT_S) == ("echo", "ready")
    ref.actor_inbox.put_inline("inline")  # type: ignore[attr-defined]
    assert log.seen == ["ready", "inline"]
    assert threading.current_thread().name in log.threads


def test_a_message_put_inline_to_a_busy_actor_waits_its_turn(dispatcher: Dispatcher) -> None:
    log = Log(expected=2)
    ref = Recorder.spawn(dispatcher, log)
    release = block(ref)
    ref.actor_inbox.put_inline("queued")  # type: ignore[attr-defined]
    assert "queued" not in log.seen  # the sender did not take the busy actor's turn
    release.set()
    assert log.all_seen.wait(WAIT_S)
    assert log.seen[-1] == "queued"
    assert threading.current_thread().name not in log.threads


def test_a_long_chain_of_direct_dispatches_reaches_its_end_without_exhausting_the_stack(
    dispatcher: Dispatcher,
) -> None:
    length = 300
    reached: list[int] = []
    done = threading.Event()

    class Link(PooledActor):
        def __init__(self, position: int) -> None:
            super().__init__()
            self.position = position
            self.next: pykka.ActorRef[Any] | None = None

        def on_receive(self, message: Any) -> None:
            if isinstance(message, pykka.ActorRef):
                self.next = message
                return
            reached.append(self.position)
            if self.next is None:
                done.set()
            else:
                self.next.actor_inbox.put_inline("go")  # type: ignore[attr-defined]

    refs = [Link.spawn(dispatcher, position) for position in range(length)]
    for ref, following in zip(refs, refs[1:]):
        ref.ask(following, timeout=WAIT_S)
    refs[0].actor_inbox.put_inline("go")  # type: ignore[attr-defined]
    assert done.wait(WAIT_S)
    assert reached == list(range(length))


def test_an_exception_in_a_told_message_is_logged_and_the_actor_carries_on(
    dispatcher: Dispatcher, caplog: pytest.LogCaptureFixture
) -> None:
    log = Log()
    ref = Recorder.spawn(dispatcher, log)
    ref.tell("fail")
    ref.actor_inbox.put_inline("fail")  # type: ignore[attr-defined]
    assert ref.ask("after", timeout=WAIT_S) == ("echo", "after")
    assert log.seen == ["after"]
    logged = [record for record in caplog.records if record.exc_info and isinstance(record.exc_info[1], ValueError)]
    assert len(logged) == 2


# --- ask -------------------------------------------------------------------------


def test_ask_returns_the_handlers_reply(dispatcher: Dispatcher) -> None:
    log = Log()
    ref = Recorder.spawn(dispatcher, log)
    assert ref.ask("ping", timeout=WAIT_S) == ("echo", "ping")


def test_ask_of_a_busy_actor_times_out_and_the_reply_still_comes_later(dispatcher: Dispatcher) -> None:
    log = Log()
    ref = Recorder.spawn(dispatcher, log)
    release = block(ref)
    with pytest.raises(pykka.Timeout):
        ref.ask("ping", timeout=0.05)
    future = ref.ask("pong", block=False)
    release.set()
    assert future.get(timeout=WAIT_S) == ("echo", "pong")


def test_an_exception_in_a_handler_is_raised_to_the_asker_and_the_actor_carries_on(
    dispatcher: Dispatcher,
) -> None:
    log = Log()
    ref = Recorder.spawn(dispatcher, log)
    with pytest.raises(ValueError, match="on purpose"):
        ref.ask("fail", timeout=WAIT_S)
    assert ref.ask("after", timeout=WAIT_S) == ("echo", "after")
    assert ref.is_alive()


# --- many actors, few threads ----------------------------------------------------


def test_two_thousand_actors_run_on_the_dispatchers_two_threads_only() -> None:
    before = dispatcher_threads()
    pool = Dispatcher(2)
    try:
        assert dispatcher_threads() == before + 2
        done = threading.Semaphore(0)
        names: set[str] = set()

        class Counter(PooledActor):
            def on_receive(self, message: Any) -> None:
                names.add(threading.current_thread().name)
                done.release()

        refs = [Counter.spawn(pool) for _ in range(2000)]
        for ref in refs:
            ref.tell("count")
        for _ in refs:
            assert done.acquire(timeout=WAIT_S)
        assert names <= {f"{PREFIX}-0", f"{PREFIX}-1"}
        assert dispatcher_threads() == before + 2
        assert all(ref.is_alive() for ref in refs)
    finally:
        pool.stop()
    assert dispatcher_threads() == before


# --- stopping --------------------------------------------------------------------


def test_a_stopped_actor_is_dead_runs_its_stop_hook_once_and_refuses_messages(dispatcher: Dispatcher) -> None:
    log = Log()
    ref = Recorder.spawn(dispatcher, log)
    assert ref.ask("ping", timeout=WAIT_S) == ("echo", "ping")
    ref.stop(timeout=WAIT_S)
    assert not ref.is_alive()
    assert log.stopped_hooks == 1
    with pytest.raises(ActorDeadError):
        ref.tell("late")
    with pytest.raises(ActorDeadError):
        ref.ask("late", timeout=WAIT_S)
    assert log.seen == ["ping"]


def test_messages_queued_behind_a_stop_are_answered_with_actor_dead(dispatcher: Dispatcher) -> None:
    log = Log()
    ref = Recorder.spawn(dispatcher, log)
    release = block(ref)
    before = ref.ask("before", block=False)
    stopped = ref.stop(block=False)
    behind = ref.ask("behind", block=False)
    release.set()
    assert before.get(timeout=WAIT_S) == ("echo", "before")
    stopped.get(timeout=WAIT_S)
    with pytest.raises(ActorDeadError):
        behind.get(timeout=WAIT_S)
    assert "behind" not in log.seen


def test_a_stopped_actor_handles_nothing_put_inline(dispatcher: Dispatcher) -> None:
    log = Log()
    ref = Recorder.spawn(dispatcher, log)
    assert ref.ask("ping", timeout=WAIT_S) == ("echo", "ping")
    ref.stop(timeout=WAIT_S)
    with pytest.raises(pykka.ActorDeadError):  # like pykka's own tell to a dead actor
        ref.actor_inbox.put_inline("after stop")  # type: ignore[attr-defined]
    assert log.seen == ["ping"]


def test_dispatcher_stop_ends_its_threads() -> None:
    before = dispatcher_threads()
    pool = Dispatcher(3)
    assert dispatcher_threads() == before + 3
    pool.stop()
    assert dispatcher_threads() == before


# --- activation and passivation of accounts --------------------------------------


def test_at_most_actors_live_max_accounts_stay_live_and_passivated_ones_keep_their_state(
    ledger_path: Path,
) -> None:
    live_max, count, funding = 8, 50, 1_000
    names = [f"acct-{n:02}" for n in range(count)]
    with Ledger.open(ledger_path, actors_live_max=live_max) as ledger:
        ledger.create_account("bank", currency="USD", overdraft_limit=None)
        expected = {"bank": 0}
        for name in names:
            ledger.create_account(name, currency="USD")
            ledger.transfer(f"fund-{name}", source="bank", destination=name, amount=funding)
            expected["bank"] -= funding
            expected[name] = funding
            assert ledger.stats()["actors_live"] <= live_max
        for round_ in range(3):
            for n, name in enumerate(names):
                destination = names[(n + 1 + 7 * round_) % count]
                amount = 10 + n + round_
                ledger.transfer(f"move-{round_}-{n}", source=name, destination=destination, amount=amount)
                expected[name] -= amount
                expected[destination] += amount
                assert ledger.stats()["actors_live"] <= live_max

        for name, posted in expected.items():  # a balance asks the actor: each is activated
            assert ledger.balance(name).posted == posted
            assert ledger.balance(name).pending == 0
            assert ledger.stats()["actors_live"] <= live_max
        stats = ledger.stats()
        assert stats["passivations"] > 0
        assert stats["activations"] > live_max
        first = names[0]
        entries = ledger.entries(first)
        assert [entry.seq for entry in entries] == list(range(1, len(entries) + 1))
        assert entries[-1].balance == expected[first]
        assert sum(entry.amount for entry in entries) == expected[first]
        hash_before = ledger.state_hash()

    with Ledger.open(ledger_path, actors_live_max=live_max) as reopened:
        assert reopened.state_hash() == hash_before
        for name, posted in expected.items():
            assert reopened.balance(name).posted == posted


def test_passivation_spares_an_idle_actor_used_since_it_last_passed(ledger_path: Path) -> None:
    with Ledger.open(ledger_path, actors_live_max=2) as ledger:
        for name in ("w", "x", "y", "z"):
            ledger.create_account(name, currency="USD")

        def live() -> set[str]:
            return set(ledger._directory._live)

        for name in ("x", "y", "z"):  # a balance pins the account's actor, live from then on
            ledger.balance(name)
        # z made three: the pass cleared the marks of x and y, then took x, the oldest.
        assert live() == {"y", "z"}
        ledger.balance("w")
        # Now z (marked when activated) comes first, but y is the one not used since the pass.
        assert live() == {"z", "w"}
        assert ledger.stats()["passivations"] == 2


def test_a_passivated_account_decides_debits_from_its_recovered_balance(ledger_path: Path) -> None:
    with Ledger.open(ledger_path, actors_live_max=2) as ledger:
        ledger.create_account("bank", currency="USD", overdraft_limit=None)
        for name in ("a", "b", "c", "d"):
            ledger.create_account(name, currency="USD")
        ledger.transfer("fund-a", source="bank", destination="a", amount=100)
        assert ledger.balance("a").posted == 100  # a balance asks the actor: "a" is live
        for n, name in enumerate(("b", "c", "d")):  # pushes "a" out of the live set
            ledger.transfer(f"fund-{name}", source="bank", destination=name, amount=1 + n)
            ledger.balance(name)
        assert ledger.stats()["passivations"] > 0
        assert ledger.stats()["actors_live"] <= 2  # so "a", used before b, c and d, is not live

        ledger.transfer("spend-all", source="a", destination="b", amount=100)
        with pytest.raises(InsufficientFunds):
            ledger.transfer("one-too-many", source="a", destination="b", amount=1)
        assert ledger.balance("a").posted == 0
        assert ledger.balance("b").posted == 101


def test_passivation_under_concurrent_transfers_keeps_the_live_set_bounded_and_the_books_right(
    ledger_path: Path,
) -> None:
    live_max, count, clients, per_client = 8, 50, 4, 150
    names = [f"acct-{n:02}" for n in range(count)]
    expected = dict.fromkeys(names, 0)
    plans: list[list[tuple[str, str, str, int]]] = [[] for _ in range(clients)]
    for client in range(clients):
        for n in range(per_client):
            source = names[(client * 13 + n * 3) % count]
            destination = names[(client * 13 + n * 3 + 1 + client) % count]
            amount = 1 + (n * 31 + client) % 97
            plans[client].append((f"c{client}-{n}", source, destination, amount))
            expected[source] -= amount
            expected[destination] += amount
    live_seen: list[int] = []
    failures: list[BaseException] = []

    with Ledger.open(ledger_path, actors_live_max=live_max, dispatcher_threads=2) as ledger:
        for name in names:  # no limit: every transfer commits whatever the interleaving
            ledger.create_account(name, currency="USD", overdraft_limit=None)
        start = threading.Barrier(clients)

        def run(plan: list[tuple[str, str, str, int]]) -> None:
            try:
                start.wait(WAIT_S)
                for tid, source, destination, amount in plan:
                    ledger.transfer(tid, source=source, destination=destination, amount=amount)
                    live_seen.append(ledger.stats()["actors_live"])
            except BaseException as error:  # reported to the test thread below
                failures.append(error)

        done = threading.Event()

        def read() -> None:
            """Balances asked meanwhile activate actors, some of accounts whose turn a
            transfer holds without one (a dormant turn: the actor waits for it)."""
            try:
                while not done.is_set():
                    for name in names:
                        ledger.balance(name)
            except BaseException as error:  # reported to the test thread below
                failures.append(error)

        threads = [threading.Thread(target=run, args=(plan,)) for plan in plans]
        reader = threading.Thread(target=read)
        for thread in (*threads, reader):
            thread.start()
        for thread in threads:
            thread.join(WAIT_S * 3)
        done.set()
        reader.join(WAIT_S)
        assert not any(thread.is_alive() for thread in (*threads, reader))
        assert failures == []
        # Pinned actors are never passivated: each transfer in flight pins two, a read one.
        assert max(live_seen) <= live_max + 2 * clients + 1
        assert ledger.stats()["passivations"] > 0
        assert ledger.stats()["in_flight"] == 0
        for name, posted in expected.items():
            assert ledger.balance(name) == Balance(posted, 0, posted)
        assert ledger.stats()["actors_live"] <= live_max
        hash_before = ledger.state_hash()

    with Ledger.open(ledger_path) as reopened:
        assert reopened.state_hash() == hash_before
