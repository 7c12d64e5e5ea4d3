"""Tally's coordinator: the transfer protocol, its journal records, and recovery.

It knows the journal and talks to accounts only through `Participant` (and, while it holds
an account's turn, `TurnAccount`).
"""

from coordinator._audit import CHECKS, AuditReport, audit, state_hash, unopened
from coordinator._claims import Refusal, check_ids_against_records, decode_outcome
from coordinator._history import (
    Checkpointed,
    Committed,
    Opened,
    Record,
    Refused,
    account_of,
    entries_of,
    last_entry,
    record_at,
    records,
    transfer_of,
)
from coordinator._coordinator import Coordinator
from coordinator._entries import decode_entry, last_row
from coordinator._errors import (
    REJECTIONS,
    AccountExists,
    AccountNotFound,
    BalanceOverflow,
    CurrencyMismatch,
    IdempotencyConflict,
    InsufficientFunds,
    InvalidRequest,
    JournalCorrupted,
    LedgerClosed,
    LedgerError,
    LedgerLocked,
    LedgerTimeout,
    LedgerUnavailable,
    NotALedger,
)
from coordinator._limits import AMOUNT_MAX, CHECKPOINT_RECORDS_INTERVAL, INFLIGHT_TRANSFERS_MAX, TIMEOUT_S_DEFAULT
from coordinator._participant import DebitStep, TurnAccount, Participant, Participants
from coordinator._records import INDEX_NAMES
from coordinator._recovery import Recovered, load_checkpoint, recover, replay, write_checkpoint
from coordinator._sequencer import Sequencer
from coordinator._state import AccountState, Posting, SequenceError, credit_refusal, debit_refusal, post
from coordinator._translate import ledger_error, ledger_errors
from coordinator._validate import (
    check_amount,
    check_currency,
    check_id,
    check_overdraft_limit,
    check_path,
    check_transfer,
    shown,
)
from coordinator._values import Account, Balance, Entry, Transfer, TransferRequest

__all__ = [
    "Checkpointed",
    "Committed",
    "Opened",
    "Record",
    "Refused",
    "account_of",
    "entries_of",
    "last_entry",
    "record_at",
    "records",
    "CHECKS",
    "AuditReport",
    "audit",
    "state_hash",
    "transfer_of",
    "unopened",
    "AMOUNT_MAX",
    "CHECKPOINT_RECORDS_INTERVAL",
    "INDEX_NAMES",
    "INFLIGHT_TRANSFERS_MAX",
    "REJECTIONS",
    "TIMEOUT_S_DEFAULT",
    "Account",
    "AccountExists",
    "AccountNotFound",
    "AccountState",
    "Balance",
    "BalanceOverflow",
    "Coordinator",
    "CurrencyMismatch",
    "DebitStep",
    "Entry",
    "IdempotencyConflict",
    "InsufficientFunds",
    "InvalidRequest",
    "JournalCorrupted",
    "LedgerClosed",
    "LedgerError",
    "LedgerLocked",
    "LedgerTimeout",
    "LedgerUnavailable",
    "NotALedger",
    "TurnAccount",
    "Participant",
    "Participants",
    "Posting",
    "Recovered",
    "Refusal",
    "SequenceError",
    "Sequencer",
    "Transfer",
    "TransferRequest",
    "check_amount",
    "check_ids_against_records",
    "check_currency",
    "check_id",
    "check_path",
    "check_overdraft_limit",
    "check_transfer",
    "shown",
    "credit_refusal",
    "debit_refusal",
    "decode_entry",
    "decode_outcome",
    "last_row",
    "ledger_error",
    "ledger_errors",
    "load_checkpoint",
    "post",
    "recover",
    "replay",
    "write_checkpoint",
]
