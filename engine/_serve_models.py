"""`tally serve`'s JSON: the request bodies (pydantic, strict) and the values as JSON.

Bodies use the Python API's names. They are strict: an int field takes a JSON integer only
(a float such as `10.0`, a bool or a string such as `"10"` is refused), a string field a JSON
string only, and a field the API does not have is refused (`extra="forbid"`), so a typo is an
error, never a silently dropped option. What the fields may hold (an amount's range, an id's
length, metadata's size) is checked by the ledger, once, as for a Python caller; only how many
members an object, the metadata or a chain's legs may have is checked here, before they are
validated, so that a body of 1 MiB of bad items is one error, not hundreds of thousands, each
made and named on the server's loop.

Imported by `engine._serve` only, after it has imported pydantic (the `serve` extra).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from engine import LINKED_LEGS_MAX, METADATA_KEYS_MAX

Scalar = str | int
"""A metadata value."""


def _at_most(items_max: int, noun: str) -> BeforeValidator:
    """Refuses a list or an object of more than `items_max` items before any of them is
    validated: pydantic checks a dict's `max_length` only once it has validated, and named,
    every item."""

    def bounded(value: Any) -> Any:
        if isinstance(value, (list, dict)) and len(value) > items_max:
            raise PydanticCustomError("too_long", "at most {items_max} {noun}, got {length}",
                                      {"items_max": items_max, "noun": noun, "length": len(value)})
        return value

    return BeforeValidator(bounded)


BodyMetadata = Annotated[dict[str, Scalar] | None, _at_most(METADATA_KEYS_MAX, "keys")]
"""A body's `metadata`: its keys counted first (the ledger checks the rest)."""


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def few_members(cls, data: Any) -> Any:
        """Refuses an object of more members than the body has fields before any is
        validated (each unknown one would be an error of its own)."""
        if isinstance(data, dict) and len(data) > len(cls.model_fields):
            raise PydanticCustomError("too_long", "{length} members, more than the fields it takes: {fields}",
                                      {"length": len(data), "fields": ", ".join(cls.model_fields)})
        return data


class AccountBody(_Body):
    """`POST /accounts`: `Ledger.create_account`'s arguments. `id`, if given, must be the
    `Idempotency-Key`."""

    id: str | None = None
    currency: str
    overdraft_limit: int | None = Field(0, description="How far below zero it may go; null: no bound.")
    code: int = 0
    metadata: BodyMetadata = None


class TransferBody(_Body):
    """`POST /transfers`: `Ledger.transfer`'s arguments. `id`, if given, must be the
    `Idempotency-Key`."""

    id: str | None = None
    source: str
    destination: str
    amount: int
    code: int = 0
    reference: str | None = None
    metadata: BodyMetadata = None
    pending: bool = False
    timeout_s: int | None = None


class LinkedBody(_Body):
    """`POST /transfers/linked`: the legs of a chain, applied all or none, in order. The
    `Idempotency-Key` is the first leg's id: `legs[0].id` is omitted or equal to it; each later
    leg `i` has its own distinct id, `{key}.{i}` when it gives none."""

    legs: Annotated[list[TransferBody], _at_most(LINKED_LEGS_MAX, "legs")] = Field(min_length=1, fail_fast=True)
    """Counted before any leg is validated, and validated up to the first bad one."""


class PostBody(_Body):
    """`POST /transfers/{pending_id}/post`: `Ledger.post_pending`'s arguments (`amount`
    null or absent: all of it). `id`, if given, must be the `Idempotency-Key`."""

    id: str | None = None
    amount: int | None = None
    reference: str | None = None
    metadata: BodyMetadata = None


class VoidBody(_Body):
    """`POST /transfers/{pending_id}/void`: `Ledger.void_pending`'s arguments (the body may
    be empty). `id`, if given, must be the `Idempotency-Key`."""

    id: str | None = None
    reference: str | None = None
    metadata: BodyMetadata = None


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
