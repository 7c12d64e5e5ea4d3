"""`tally serve`'s JSON: the request bodies (pydantic, strict) and the values as JSON.

Bodies use the Python API's names. They are strict: an int field takes a JSON integer only
(a float such as `10.0`, a bool or a string such as `"10"` is refused), a string field a JSON
string only, and a field the API does not have is refused (`extra="forbid"`), so a typo is an
error, never a silently dropped option. What the fields may hold (an amount's range, an id's
length, metadata's size) is checked by the ledger, once, as for a Python caller.

Imported by `engine._serve` only, after it has imported pydantic (the `serve` extra).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Scalar = str | int
"""A metadata value."""


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class AccountBody(_Body):
    """`POST /accounts`: `Ledger.create_account`'s arguments. `id`, if given, must be the
    `Idempotency-Key`."""

    id: str | None = None
    currency: str
    overdraft_limit: int | None = Field(0, description="How far below zero it may go; null: no bound.")
    code: int = 0
    metadata: dict[str, Scalar] | None = None


class TransferBody(_Body):
    """`POST /transfers`: `Ledger.transfer`'s arguments. `id`, if given, must be the
    `Idempotency-Key`."""

    id: str | None = None
    source: str
    destination: str
    amount: int
    code: int = 0
    reference: str | None = None
    metadata: dict[str, Scalar] | None = None
    pending: bool = False
    timeout_s: int | None = None


class LinkedBody(_Body):
    """`POST /transfers/linked`: the legs of a chain, applied all or none, in order. The
    `Idempotency-Key` is the first leg's id: `legs[0].id` is omitted or equal to it; each later
    leg `i` has its own distinct id, `{key}.{i}` when it gives none."""

    legs: list[TransferBody] = Field(min_length=1)


class PostBody(_Body):
    """`POST /transfers/{pending_id}/post`: `Ledger.post_pending`'s arguments (`amount`
    null or absent: all of it). `id`, if given, must be the `Idempotency-Key`."""

    id: str | None = None
    amount: int | None = None
    reference: str | None = None
    metadata: dict[str, Scalar] | None = None


class VoidBody(_Body):
    """`POST /transfers/{pending_id}/void`: `Ledger.void_pending`'s arguments (the body may
    be empty). `id`, if given, must be the `Idempotency-Key`."""

    id: str | None = None
    reference: str | None = None
    metadata: dict[str, Scalar] | None = None


# --- responses, for the OpenAPI document (the routes write the JSON themselves) ------------


class AccountJSON(BaseModel):
    id: str
    currency: str
    overdraft_limit: int | None
    code: int
    metadata: dict[str, Scalar] | None


class TransferJSON(BaseModel):
    id: str
    source: str
    destination: str
    amount: int
    lsn: int
    timestamp: int
    code: int
    reference: str | None
    metadata: dict[str, Scalar] | None
    kind: Literal["single", "pending", "post", "void"]
    pending_id: str | None
    status: Literal["pending", "posted", "voided", "expired"]
    timeout_s: int | None


class TransfersJSON(BaseModel):
    transfers: list[TransferJSON]


class BalanceJSON(BaseModel):
    posted: int
    pending: int
    available: int
    incoming: int


class EntryJSON(BaseModel):
    account: str
    seq: int
    transfer_id: str
    amount: int
    balance: int
    lsn: int
    timestamp: int


class EntriesJSON(BaseModel):
    entries: list[EntryJSON]


class ErrorDetail(BaseModel):
    code: str
    message: str
    index: int | None = Field(None, description="linked_transfer_failed: the refused leg's place in the chain.")
    cause: dict[str, str] | None = Field(None, description="linked_transfer_failed: the leg's own code and message.")


class ErrorJSON(BaseModel):
    error: ErrorDetail


class HealthJSON(BaseModel):
    status: Literal["ok"]


# --- values as JSON ------------------------------------------------------------------------
