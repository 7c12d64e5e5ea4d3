"""What `tally serve` takes of a request before a route reads it (README.md, "Serving over
HTTP"): a number in a query or a header is decimal digits alone (`Whole`, `WholeOrNone`); a
route takes only the query parameters it declares, each once (`refuse_queries`); and a JSON
body gives no key twice. `StrictRoute`, the route class of `engine._serve_routes`' router,
checks the last two as it hands a request to its route; each refusal is `InvalidRequest` (a
400, `engine._serve_errors`), or the validation error pydantic makes of a number.

Runs on the server's event loop; nothing here awaits anything but the request's body.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Coroutine
from typing import Annotated, Any

from fastapi import Request, Response
from fastapi.routing import APIRoute
from pydantic import BeforeValidator
from pydantic_core import PydanticCustomError

from engine import InvalidRequest


def digits_alone(value: Any) -> Any:
    """A number in a query or a header is ASCII decimal digits alone: pydantic's lax int would
    read `1_0` as 10, and `3.0`, `+3` or ` 3` as 3 (Python's `int` another script's digits
    too), a client's slip answered as if it had meant another number."""
    if isinstance(value, str) and not (value.isascii() and value.isdigit()):
        raise PydanticCustomError("int_parsing", "Input should be a whole number in the digits 0-9 alone")
    return value


Whole = Annotated[int, BeforeValidator(digits_alone)]
"""A query parameter's or a header's number."""
WholeOrNone = Annotated[int | None, BeforeValidator(digits_alone)]


def refuse_queries(request: Request, known: frozenset[str]) -> None:
    """`InvalidRequest` for a query parameter not in `known`, or one given twice."""
    if not request.scope.get("query_string"):  # (most requests: nothing to look at)
        return
    given = [name for name, _ in request.query_params.multi_items()]
    names = set(given)
    unknown = sorted(names - known)
    if unknown:
        raise InvalidRequest(f"unknown query parameter(s) {', '.join(map(repr, unknown))}: "
                             + (f"this route takes {', '.join(sorted(known))}" if known else "this route takes none"))
    if len(names) != len(given):
        repeated = sorted(name for name, count in Counter(given).items() if count > 1)
        raise InvalidRequest(f"query parameter(s) {', '.join(map(repr, repeated))} given more than once: give each once")


def _query_names(route: APIRoute) -> frozenset[str]:
    """The query parameters a route declares (its dependencies' too): found once, as its
    handler is made."""
    names: set[str] = set()
    waiting = [route.dependant]
    while waiting:
        dependant = waiting.pop()
        names.update(field.alias for field in dependant.query_params)
        waiting += dependant.dependencies
    return frozenset(names)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object's members as a dict, refusing a key given twice (a proxy or a log that
    reads the first of two `amount`s would record another amount than the ledger moved)."""
    members = dict(pairs)
    if len(members) != len(pairs):
        seen: set[str] = set()
        for name, _ in pairs:
            if name in seen:
                raise json.JSONDecodeError(f"the key {name!r} is given more than once in an object", "", 0)
            seen.add(name)
    return members


class _StrictBody(Request):
    """A request whose JSON body may not give a key twice (`_unique_keys`)."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = json.loads(await self.body(), object_pairs_hook=_unique_keys)
        return self._json


class StrictRoute(APIRoute):
    """A route that takes only the query parameters it declares, each once (a misspelt filter,
    `?acount=`, would otherwise be ignored, and the answer read as filtered when it is not;
    `/health` ignores its query, a probe's cache-buster), and reads its body as `_StrictBody`."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        known = _query_names(self)
        checked = self.path != "/health"

        async def strict(request: Request) -> Response:
            if checked:
                refuse_queries(request, known)
            return await handler(_StrictBody(request.scope, request.receive))

        return strict

