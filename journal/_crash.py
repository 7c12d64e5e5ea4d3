"""Named crash points, for tests that kill the process at an exact step.

With `TALLY_CRASH_AT=NAME` (or `NAME:N`, the N-th time it is reached) in the
environment, reaching that point ends the process at once with `os._exit(99)`:
no clean-up, no flush, exactly as a crash. Without the variable a point costs a
call that returns at once, or, where it is tested first (`ARMED`), one global lookup.

The points, in the order a transfer meets them:
- `after-reserve`: the source has reserved the funds, nothing is journaled yet;
- `after-commit-queued`: the commit record is queued, not yet durable;
- `between-entries`: the debit is queued to the source, the credit not yet;
- `mid-group-commit`: half of a group commit's records are staged;
- `after-commit-durable`: the group commit is on disk, no caller acknowledged;
- `during-checkpoint`: a checkpoint record is queued, not yet durable;
- `mid-checkpoint-entries`: a slice of a checkpoint's entry index rows is durable, the rest
  (and the mark that says they are all in) not yet;
- `during-expiry`: an expiry record is queued, the holds it releases not yet delivered;
- `mid-linked-chain`: a linked chain is decided and its first leg applied to (or, through the
  mailboxes, its record queued and its first leg delivered to) its accounts, the other legs
  not yet.
"""

from __future__ import annotations

import os

POINTS = (
    "after-reserve",
    "after-commit-queued",
    "between-entries",
    "mid-group-commit",
    "after-commit-durable",
    "during-checkpoint",
    "mid-checkpoint-entries",
    "during-expiry",
    "mid-linked-chain",
)
EXIT_CODE = 99

_spec = os.environ.get("TALLY_CRASH_AT")
ARMED = _spec is not None
"""Whether a point is armed in this process. A path taken once per transfer tests it before
calling `crash_point`: the test is a global lookup, the call a Python frame."""
_name, _, _count = (_spec or "").partition(":")
_remaining = int(_count) if _count else 1
assert not ARMED or _name in POINTS, f"TALLY_CRASH_AT names an unknown crash point: {_name!r}"


def crash_point(name: str) -> None:
    """Die here if this is the armed point (and its count is reached)."""
    global _remaining
    if not ARMED or name != _name:
        return
    _remaining -= 1
    if _remaining <= 0:
        os._exit(EXIT_CODE)
