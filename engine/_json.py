"""`jsonable`: a value of the engine as plain JSON values, as `tally tail --json` and
`tally serve` write it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields, is_dataclass
from functools import cache
from typing import Any


def jsonable(value: Any) -> Any:
    """A value of the engine (`Transfer`, `Account`, `Balance`, `Entry`, `Event`, `Head`, and
    the requests an `Event` of a refusal carries) as values `json.dumps` takes: a dataclass as
    an object of its fields, metadata as an object, a tuple as a list; str, int and None as
    they are."""
    if is_dataclass(value) and not isinstance(value, type):
        return {name: jsonable(getattr(value, name)) for name in _field_names(type(value))}
    if isinstance(value, Mapping):
        return {key: jsonable(item) for key, item in value.items()}
    if isinstance(value, (tuple, list)):
        return [jsonable(item) for item in value]
    return value


@cache
def _field_names(kind: type) -> tuple[str, ...]:
    return tuple(field.name for field in fields(kind))
