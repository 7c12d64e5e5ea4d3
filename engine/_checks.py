"""The checks of a `Ledger` call's arguments that the ledger makes itself, and a balance read
from a projection; each malformed argument is `InvalidRequest` before anything is done. (The
checks of a transfer's own fields are the coordinator's: `coordinator._validate`.) Shared by
`Ledger`, `AsyncLedger` (which checks on its loop) and `ShardedLedger`.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from coordinator import (
    Account,
    AccountExists,
    Balance,
    InvalidRequest,
    LedgerError,
    Projection,
    Resolution,
    TransferRequest,
    check_code,
    check_currency,
    check_id,
    check_metadata,
    check_overdraft_limit,
    items_of,
    seconds_of,
    shown,
)




def account_exists(existing: Account) -> AccountExists:
    metadata = "no metadata" if existing.metadata is None else f"metadata {existing.metadata.as_dict()!r}"
    limit = "no overdraft limit" if existing.overdraft_limit is None else f"overdraft_limit {existing.overdraft_limit}"
    return AccountExists(f"account {existing.id!r} exists with other fields: {existing.currency}, {limit}, "
                         f"code {existing.code}, {metadata}")


def balance_of(books: Projection, account_id: str) -> Balance:
    """The account's balance in a projection of the journal (no reservation: none is journaled)."""
    _, posted, _ = books.states[account_id]
    held = books.held.get(account_id, 0)
    return Balance(posted, held, posted - held, books.incoming.get(account_id, 0))


def checked_account(account_id: object, currency: object, overdraft_limit: object, code: object,
                    metadata: object) -> Account:
    """`create_account`'s arguments, each checked (in this order), as an Account; raises
    `InvalidRequest` for the first malformed one."""
    return Account(check_id(account_id, "account id"), check_currency(currency),
                   check_overdraft_limit(overdraft_limit), check_code(code), check_metadata(metadata))


def check_timeout_s(timeout_s: object) -> float:
    """`Ledger.open`'s `timeout_s`, as a float; `InvalidRequest` unless a number of seconds a
    lock can wait."""
    wait_s = seconds_of(timeout_s)
    if not (wait_s is not None and 0 < wait_s <= threading.TIMEOUT_MAX):  # False for NaN
        raise InvalidRequest(f"timeout_s must be a number of seconds in (0, {threading.TIMEOUT_MAX:.0f}] "
                             f"(the most a lock can wait), got {shown(timeout_s)}")
    return float(wait_s)


def checked_accounts(accounts: object) -> list[Account | LedgerError]:
    """`create_accounts`' items, each checked: the Account, or the `InvalidRequest` it is.
    Raises `InvalidRequest` if `accounts` is not a sequence."""
    if not isinstance(accounts, Sequence) or isinstance(accounts, (str, bytes)):
        raise InvalidRequest(f"create_accounts takes a sequence of Account, got {type(accounts).__name__}")
    results: list[Account | LedgerError] = []
    for item in items_of(accounts, "create_accounts"):
        try:
            if not isinstance(item, Account):
                raise InvalidRequest(f"create_accounts takes Account items, got {type(item).__name__}")
            results.append(checked_account(item.id, item.currency, item.overdraft_limit, item.code, item.metadata))
        except LedgerError as error:
            results.append(error)
    return results


def checked_many(requests: object) -> tuple[list[TransferRequest | Resolution], dict[int, LedgerError]]:
    """`transfer_many`'s items, and the `InvalidRequest` of each that is a post or a void by
    its index. Raises `InvalidRequest` if `requests` is not a sequence."""
    if not isinstance(requests, Sequence) or isinstance(requests, (str, bytes)):
        raise InvalidRequest(f"transfer_many takes a sequence of TransferRequest, got {type(requests).__name__}")
    items: list[TransferRequest | Resolution] = items_of(requests, "transfer_many")
    refused: dict[int, LedgerError] = {
        i: InvalidRequest(f"transfer_many takes TransferRequest items, not a post or a void of pending transfer "
                          f"{item.pending_id!r}: call post_pending or void_pending")
        for i, item in enumerate(items) if type(item) is Resolution}
    return items, refused


def check_page(after: object, limit: object) -> None:
    """`entries`' `after` and `limit`; `InvalidRequest` if malformed."""
    if type(after) is not int or after < 0:
        raise InvalidRequest(f"after must be an int >= 0, got {shown(after)}")
    if limit is not None and (type(limit) is not int or limit < 0):
        raise InvalidRequest(f"limit must be None or an int >= 0, got {shown(limit)}")
