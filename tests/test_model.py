"""The ledger against a plain-dict model, driven by a hypothesis state machine.

The model applies every request sequentially with the documented semantics
(overdraft limits, overflow, idempotent retries, refusals that consume the id,
malformed requests that consume nothing). After every step the ledger must
agree with it exactly, money must be conserved, and every account's entries
must be gapless running sums. One rule closes and reopens the ledger: replay
must rebuild the same state, down to the state hash and the retry outcomes.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from engine import (
    Account,
    AccountExists,
    AccountNotFound,
    Balance,
    BalanceOverflow,
    CurrencyMismatch,
    IdempotencyConflict,
    InsufficientFunds,
    InvalidRequest,
    Ledger,
    LedgerError,
    Transfer,
    TransferRequest,
)
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

AMOUNT_MAX = 2**63 - 1
TIMEOUT_S = 10.0

ACCOUNT_IDS = ("a", "b", "c", "d", "e")
INITIAL_ACCOUNT_IDS = ACCOUNT_IDS[:4]
"""Opened with the ledger; "e" exists only once a rule creates it (AccountNotFound till then)."""
TRANSFER_IDS = tuple(f"t-{n}" for n in range(8))
"""A small pool of ids reused on purpose: retries with other fields must conflict."""
CURRENCIES = ("USD", "EUR")
OVERDRAFT_LIMITS = (None, 0, 50)
SPECIAL_AMOUNTS = (0, -5, 2**62, AMOUNT_MAX, AMOUNT_MAX + 1)
"""Malformed amounts (0, -5, 2**63) and huge valid ones that hit the overflow checks."""

CHECKPOINT_INTERVALS = (3, 1_000_000)
"""Records between checkpoints: every few records (reopen starts from a checkpoint and
replays the tail), or never within an example (reopen replays everything)."""

COMMITTED = "committed"
"""The model's outcome for a transfer that posted; refusals are their error class."""

FRESH = None
"""In a drawn request, stands for a new id the machine makes up (`f-1`, `f-2`...)."""

Draw = tuple[str | None, str, str, int]
"""(transfer id or FRESH, source, destination, amount), turned into a request by the machine."""

account_ids = st.sampled_from(ACCOUNT_IDS)
# USD three times out of four, so most pairs of accounts can trade.
currencies = st.one_of(st.just("USD"), st.just("USD"), st.just("USD"), st.sampled_from(CURRENCIES))
limits = st.sampled_from(OVERDRAFT_LIMITS)
account_specs = st.tuples(account_ids, currencies, limits)
transfer_ids = st.one_of(st.just(FRESH), st.just(FRESH), st.sampled_from(TRANSFER_IDS))
distinct_pairs = st.sampled_from(tuple((s, d) for s in ACCOUNT_IDS for d in ACCOUNT_IDS if s != d))


def _draw(transfer_id: str | None, pair: tuple[str, str], amount: int) -> Draw:
    return (transfer_id, pair[0], pair[1], amount)


plain_draws = st.builds(_draw, transfer_ids, distinct_pairs, st.integers(1, 200))
"""Well formed, between two distinct accounts, small amounts."""
special_amount_draws = st.builds(_draw, transfer_ids, distinct_pairs, st.sampled_from(SPECIAL_AMOUNTS))
odd_draws = st.one_of(
    special_amount_draws,
    special_amount_draws,
    st.builds(_draw, transfer_ids, account_ids.map(lambda a: (a, a)), st.integers(1, 200)),
)
"""A huge or malformed amount, or the same account on both sides."""


@dataclass
class Model:
    """What the ledger must hold, computed one request after another."""

    accounts: dict[str, Account] = field(default_factory=dict)
    """In creation order (dicts keep insertion order)."""
    posted: dict[str, int] = field(default_factory=dict)
    entries: dict[str, list[tuple[str, int, int]]] = field(default_factory=dict)
    """Per account: (transfer id, signed amount, balance after) in seq order."""
    outcomes: dict[str, tuple[tuple[str, str, int], object]] = field(default_factory=dict)
    """Per consumed transfer id: its fields and COMMITTED or the refusal's error class."""

    def create_account(self, account: Account) -> type[LedgerError] | None:
        existing = self.accounts.get(account.id)
        if existing is not None:
            return None if existing == account else AccountExists
        self.accounts[account.id] = account
        self.posted[account.id] = 0
        self.entries[account.id] = []
        return None

    def transfer(self, request: TransferRequest) -> object:
        """COMMITTED or the error class the ledger must raise; applies the outcome."""
        amount = request.amount
        if type(amount) is not int or not 1 <= amount <= AMOUNT_MAX or request.source == request.destination:
            return InvalidRequest
        fields = (request.source, request.destination, amount)
        prior = self.outcomes.get(request.id)
        if prior is not None:
            prior_fields, outcome = prior
            return outcome if prior_fields == fields else IdempotencyConflict
        outcome = self._decide(request)
        self.outcomes[request.id] = (fields, outcome)
        if outcome is COMMITTED:
            self._post(request.source, request.id, -amount)
            self._post(request.destination, request.id, amount)
        return outcome

    def _decide(self, request: TransferRequest) -> object:
        source = self.accounts.get(request.source)
        destination = self.accounts.get(request.destination)
        if source is None or destination is None:
            return AccountNotFound
        if source.currency != destination.currency:
            return CurrencyMismatch
        after_debit = self.posted[source.id] - request.amount
        if source.overdraft_limit is None:
            if after_debit < -AMOUNT_MAX:
                return BalanceOverflow
        elif after_debit < -source.overdraft_limit:
            return InsufficientFunds
        if self.posted[destination.id] + request.amount > AMOUNT_MAX:
            return BalanceOverflow
        return COMMITTED

    def _post(self, account_id: str, transfer_id: str, amount: int) -> None:
        self.posted[account_id] += amount
        self.entries[account_id].append((transfer_id, amount, self.posted[account_id]))


class LedgerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.directory = tempfile.mkdtemp(prefix="tally-model-")
        self.path = Path(self.directory) / "ledger"
        self.ledger: Ledger | None = None
        """Set by the initialize rule, so every rule and invariant sees an open ledger."""
        self.model = Model()
        self.checkpoint_interval = CHECKPOINT_INTERVALS[-1]
        self.fresh_ids = 0
        self.outcomes_at_reopen = 0
        """Consumed ids at the last reopen: reopen again only once something new happened."""
        self.transfers: dict[str, Transfer] = {}
        """The Transfer the ledger first returned for each committed id (with its LSN)."""

    @initialize(
        specs=st.lists(st.tuples(currencies, limits), min_size=4, max_size=4),
        checkpoint_interval=st.sampled_from(CHECKPOINT_INTERVALS),
    )
    def open_ledger_with_four_accounts(self, specs: list[tuple[str, int | None]], checkpoint_interval: int) -> None:
        self.checkpoint_interval = checkpoint_interval
        self.ledger = self.open()
        for account_id, (currency, limit) in zip(INITIAL_ACCOUNT_IDS, specs):
            self.create_account(account_id, currency, limit)

    def open(self) -> Ledger:
        return Ledger.open(self.path, timeout_s=TIMEOUT_S, checkpoint_interval=self.checkpoint_interval)

    def teardown(self) -> None:
        try:
            if self.ledger is not None:
                self.ledger.close()
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)

    # --- rules -----------------------------------------------------------------------

    @rule(spec=account_specs)
    def create_account_rule(self, spec: tuple[str, str, int | None]) -> None:
        self.create_account(*spec)

    def create_account(self, account_id: str, currency: str, limit: int | None) -> None:
        account = Account(account_id, currency, limit)
        expected = self.model.create_account(account)
        if expected is None:
            assert self.ledger.create_account(account_id, currency=currency, overdraft_limit=limit) == account
        else:
            with pytest.raises(expected):
                self.ledger.create_account(account_id, currency=currency, overdraft_limit=limit)

    def request(self, draw: Draw) -> TransferRequest:
        transfer_id, source, destination, amount = draw
        if transfer_id is FRESH:
            self.fresh_ids += 1
            transfer_id = f"f-{self.fresh_ids}"
        return TransferRequest(transfer_id, source, destination, amount)

    @rule(draw=plain_draws)
    def transfer(self, draw: Draw) -> None:
        self.check_transfer(self.request(draw))

    @rule(draw=odd_draws)
    def transfer_with_an_odd_amount_or_one_account(self, draw: Draw) -> None:
        self.check_transfer(self.request(draw))

    @rule(transfer_id=transfer_ids, pair=distinct_pairs, side=st.sampled_from(("source", "destination")),
          extra=st.sampled_from((0, 1)))
    def transfer_exactly_to_a_limit_or_one_past_it(
        self, transfer_id: str | None, pair: tuple[str, str], side: str, extra: int
    ) -> None:
        """The largest amount the source may spend (or the destination may take), plus 0 or 1."""
        source, destination = (self.model.accounts.get(account_id) for account_id in pair)
        room = 1
        if side == "source" and source is not None:
            limit = AMOUNT_MAX if source.overdraft_limit is None else source.overdraft_limit
            room = min(self.model.posted[source.id] + limit, AMOUNT_MAX)
        elif side == "destination" and destination is not None:
            room = AMOUNT_MAX - self.model.posted[destination.id]
        self.check_transfer(self.request((transfer_id, *pair, max(room, 1) + extra)))

    @precondition(lambda self: self.model.outcomes)
    @rule(pick=st.integers(0, 10**6), batched=st.booleans())
    def retry_a_used_id_with_the_same_fields(self, pick: int, batched: bool) -> None:
        used = list(self.model.outcomes)
        transfer_id = used[pick % len(used)]
        (source, destination, amount), _ = self.model.outcomes[transfer_id]
        request = TransferRequest(transfer_id, source, destination, amount)
        if batched:
            self.check_batch([request])
        else:
            self.check_transfer(request)

    def check_transfer(self, request: TransferRequest) -> None:
        expected = self.model.transfer(request)
        try:
            actual: Transfer | LedgerError = self.ledger.transfer(
                request.id, source=request.source, destination=request.destination, amount=request.amount
            )
        except LedgerError as error:
            actual = error
        self.check_outcome(request, expected, actual)

    @rule(draws=st.lists(plain_draws, max_size=5))
    def transfer_many(self, draws: list[Draw]) -> None:
        self.check_batch([self.request(draw) for draw in draws])

    @rule(draws=st.lists(plain_draws, max_size=4), odd=odd_draws, position=st.integers(0, 4))
    def transfer_many_with_one_odd_request(self, draws: list[Draw], odd: Draw, position: int) -> None:
        draws.insert(position, odd)
        self.check_batch([self.request(draw) for draw in draws])

    def check_batch(self, batch: list[TransferRequest]) -> None:
        expected = [self.model.transfer(request) for request in batch]
        actual = self.ledger.transfer_many(batch)
        assert len(actual) == len(batch)
        for request, want, got in zip(batch, expected, actual):
            self.check_outcome(request, want, got)

    @precondition(lambda self: len(self.model.outcomes) > self.outcomes_at_reopen)
    @rule()
    def close_and_reopen(self) -> None:
        self.outcomes_at_reopen = len(self.model.outcomes)
        state_hash = self.ledger.state_hash()
        self.ledger.close()
        self.ledger = self.open()
        assert self.ledger.state_hash() == state_hash

    def check_outcome(self, request: TransferRequest, expected: object, actual: Transfer | LedgerError) -> None:
        if expected is COMMITTED:
            assert isinstance(actual, Transfer), f"{request} should commit, got {actual!r}"
            assert (actual.id, actual.source, actual.destination, actual.amount) == (
                request.id, request.source, request.destination, request.amount
            )
            first = self.transfers.setdefault(request.id, actual)
            assert actual == first, "a retry returns the original Transfer, LSN included"
        else:
            assert type(actual) is expected, f"{request} should raise {expected.__name__}, got {actual!r}"

    # --- invariants ------------------------------------------------------------------

    @invariant()
    def accounts_are_the_models_in_creation_order(self) -> None:
        assert self.ledger.accounts() == list(self.model.accounts.values())

    @invariant()
    def balances_equal_the_model_and_nothing_is_pending(self) -> None:
        for account_id, posted in self.model.posted.items():
            assert self.ledger.balance(account_id) == Balance(posted, 0, posted)

    @invariant()
    def money_is_conserved(self) -> None:
        assert sum(self.model.posted.values()) == 0
        assert sum(self.ledger.balance(account_id).posted for account_id in self.model.accounts) == 0

    @invariant()
    def entries_are_gapless_running_sums_equal_to_the_model(self) -> None:
        for account_id, expected in self.model.entries.items():
            entries = self.ledger.entries(account_id)
            assert [entry.seq for entry in entries] == list(range(1, len(expected) + 1))
            assert [(e.transfer_id, e.amount, e.balance) for e in entries] == expected
            running = 0
            for entry in entries:
                running += entry.amount
                assert entry.account == account_id
                assert entry.balance == running
                assert entry.lsn == self.transfers[entry.transfer_id].lsn

    @invariant()
    def get_transfer_agrees_with_the_model(self) -> None:
        for transfer_id in (*TRANSFER_IDS, *self.model.outcomes):
            assert self.ledger.get_transfer(transfer_id) == self.transfers.get(transfer_id)
            outcome = self.model.outcomes.get(transfer_id)
            assert (transfer_id in self.transfers) == (outcome is not None and outcome[1] is COMMITTED)


LedgerMachine.TestCase.settings = settings(
    max_examples=40,
    stateful_step_count=30,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_the_ledger_agrees_with_a_sequential_dict_model = LedgerMachine.TestCase
