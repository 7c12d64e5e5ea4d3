"""`RemoteLedger`: a ledger served by `tally serve`, driven over HTTP with `Ledger`'s method names.

`tally stress --url` hands one to the same workload and auditor that drive an in-process
`Ledger` (`engine._stress`, `engine._auditor`), so a deployed host is proven the way the
library is. It speaks the HTTP contract of issue 16 and nothing else: `POST /accounts`,
`GET /accounts/{id}`, `GET /accounts/{id}/balance`, `GET /accounts/{id}/entries`,
`POST /transfers`, `POST /transfers/linked`, `POST /transfers/{pending_id}/post` and `/void`,
`GET /transfers/{id}`, each write keyed by an `Idempotency-Key` header (its transfer or
account id).

Threads: one `httpx.Client` (which may be shared between threads) with a pool of
`connections` keep-alive connections; a method blocks its caller until the reply, at most
`timeout_s` (a pool slot, the connection and the reply each). `create_accounts` and
`transfer_many` send one request an item, `connections` at a time, and return the outcomes in
order (the HTTP API has no batch route; unlike `Ledger.transfer_many` they are not decided in
list order).

Errors: as a `Ledger`'s, raised from the server's error replies; what breaks the HTTP contract
is `UnexpectedReply` (kept in `faults`), no answer `ServerUnreachable` (`NotSent` if nothing
was sent): `engine._remote_replies` says which is which.

Here: the methods, each one request, and sending it (`_send`). What a reply means (its JSON
read into the engine's values, an error body into its `LedgerError`, the statuses the
contract allows, the faults kept) and the errors above are in `engine._remote_replies`
(`ReplyChecks`, `RemoteLedger`'s base class).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import quote, urlsplit

import httpx

from coordinator import (
    REJECTIONS,
    Account,
    AccountNotFound,
    Balance,
    Entry,
    InvalidRequest,
    LedgerError,
    LinkedTransferFailed,
    Transfer,
    TransferRequest,
)
from engine._remote_replies import Missing, NotSent, ReplyChecks, ServerUnreachable

REMOTE_TIMEOUT_S_DEFAULT = 60.0
"""Longest wait for a pool slot, a connection or a reply: above the server's own bound on a
ledger call (30 s by default, then 503 `timeout`), so the server's answer comes first."""
REMOTE_CONNECTIONS_DEFAULT = 16
ENTRIES_PAGE_SIZE = 1000
"""Entries asked for per `GET /accounts/{id}/entries`; `entries` pages until a page is empty."""


class RemoteLedger(ReplyChecks):
    """A `tally serve` at `url`, with the `Ledger` methods the stress harness and its auditor call."""

    def __init__(self, url: str, *, token: str | None = None, connections: int = REMOTE_CONNECTIONS_DEFAULT,
                 timeout_s: float = REMOTE_TIMEOUT_S_DEFAULT) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InvalidRequest(f"{url!r} is not an http:// or https:// URL with a host")
        assert connections >= 1 and timeout_s > 0
        self.url = url.rstrip("/")
        self._connections = connections
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        self._client = httpx.Client(base_url=self.url, headers=headers, timeout=httpx.Timeout(timeout_s),
                                    limits=httpx.Limits(max_connections=connections,
                                                        max_keepalive_connections=connections))
        self._timeout_s = timeout_s
        self._token = token is not None
        self._lock = threading.Lock()
        self._created: dict[str, None] = {}
        self._answered: set[str] = set()
        self._sent: set[str] = set()
        self.faults: list[str] = []
        self.fault_count = 0
        self.accounts_gone: list[str] = []
        """The accounts this client created that the last `accounts` call did not find."""

    def __enter__(self) -> RemoteLedger:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the pooled connections. Blocks until they are closed."""
        self._client.close()

    # --- accounts ------------------------------------------------------------------

    def create_account(self, id: str, *, currency: str, overdraft_limit: int | None = 0, code: int = 0,
                       metadata: Mapping[str, str | int] | None = None) -> Account:
        """`POST /accounts`; the account as the server made it. Raises as `Ledger.create_account`."""
        body: dict[str, Any] = {"id": id, "currency": currency, "overdraft_limit": overdraft_limit}
        if code:
            body["code"] = code
        if metadata is not None:
            body["metadata"] = dict(metadata)
        made = self._read(Account, self._send("POST", "/accounts", key=id, body=body))
        with self._lock:
            self._created[made.id] = None
        return made

    def create_accounts(self, accounts: Sequence[Account]) -> list[Account | LedgerError]:
        """`create_account` for each, `connections` at a time: one outcome per item, in order."""
        return self._each(accounts, lambda a: self.create_account(a.id, currency=a.currency,
                                                                  overdraft_limit=a.overdraft_limit, code=a.code,
                                                                  metadata=a.metadata))

    def account(self, id: str) -> Account:
        """`GET /accounts/{id}`. Raises `AccountNotFound`."""
        return self._read(Account, self._send("GET", f"/accounts/{_part(id)}"))

    def accounts(self) -> list[Account]:
        """The accounts this client created, in the order their creations were answered, each read
        from the server: not every account the server holds (a server is shared; an audit proves
        what its run made). One the server no longer has (it lost its books) is left out and
        named in `accounts_gone`."""
        with self._lock:
            created = list(self._created)
        found: list[Account] = []
        gone: list[str] = []
        for account_id in created:
            try:
                found.append(self.account(account_id))
            except AccountNotFound:
                gone.append(account_id)
        self.accounts_gone = gone
        return found

    def balance(self, account: str) -> Balance:
        """`GET /accounts/{id}/balance`. Raises `AccountNotFound`."""
        return self._read(Balance, self._send("GET", f"/accounts/{_part(account)}/balance"))

    def entries(self, account: str, after: int = 0, limit: int | None = None) -> list[Entry]:
        """The account's entries with seq > `after`, at most `limit`, a page of
        `ENTRIES_PAGE_SIZE` per `GET /accounts/{id}/entries` until a page comes back empty."""
        found: list[Entry] = []
        while limit is None or len(found) < limit:
            asked = ENTRIES_PAGE_SIZE if limit is None else min(ENTRIES_PAGE_SIZE, limit - len(found))
            page = self._send("GET", f"/accounts/{_part(account)}/entries", params={"after": after, "limit": asked})
            rows = [self._read(Entry, row) for row in self._rows(page, "entries")]
            if not rows:
                break
            found.extend(rows)
            after = rows[-1].seq
        return found

    # --- transfers -----------------------------------------------------------------

    def transfer(self, id: str, *, source: str, destination: str, amount: int, code: int = 0,
                 reference: str | None = None, metadata: Mapping[str, str | int] | None = None,
                 pending: bool = False, timeout_s: int | None = None) -> Transfer:
        """`POST /transfers` keyed by `id`. Raises as `Ledger.transfer`."""
        body = _transfer_body(TransferRequest(id, source, destination, amount, code, reference, metadata,
                                              pending, timeout_s))
        self._sending(id)
        return self._read(Transfer, self._send("POST", "/transfers", key=id, body=body))

    def transfer_many(self, requests: Sequence[TransferRequest]) -> list[Transfer | LedgerError]:
        """`transfer` for each, `connections` at a time: one outcome per request, in order."""
        return self._each(requests, lambda r: self.transfer(r.id, source=r.source, destination=r.destination,
                                                            amount=r.amount, code=r.code, reference=r.reference,
                                                            metadata=r.metadata, pending=r.pending,
                                                            timeout_s=r.timeout_s))

    def transfer_linked(self, requests: Sequence[TransferRequest]) -> list[Transfer]:
        """`POST /transfers/linked` keyed by the first leg's id, every leg naming its own.
        Raises `LinkedTransferFailed`."""
        assert requests, "a chain has at least one leg"
        body = {"legs": [{"id": r.id, **_transfer_body(r)} for r in requests]}
        self._sending(*(r.id for r in requests))
        reply = self._send("POST", "/transfers/linked", key=requests[0].id, body=body)
        return [self._read(Transfer, row) for row in self._rows(reply, "transfers")]

    def post_pending(self, id: str, *, pending_id: str, amount: int | None = None,
                     reference: str | None = None, metadata: Mapping[str, str | int] | None = None) -> Transfer:
        """`POST /transfers/{pending_id}/post` keyed by `id`. Raises as `Ledger.post_pending`."""
        body = _optional(amount=amount, reference=reference, metadata=metadata)
        self._sending(id)
        reply = self._send("POST", f"/transfers/{_part(pending_id)}/post", key=id, body=body)
        return self._read(Transfer, reply)

    def void_pending(self, id: str, *, pending_id: str, reference: str | None = None,
                     metadata: Mapping[str, str | int] | None = None) -> Transfer:
        """`POST /transfers/{pending_id}/void` keyed by `id`. Raises as `Ledger.void_pending`."""
        body = _optional(reference=reference, metadata=metadata)
        self._sending(id)
        reply = self._send("POST", f"/transfers/{_part(pending_id)}/void", key=id, body=body)
        return self._read(Transfer, reply)

    def get_transfer(self, id: str) -> Transfer | None:
        """`GET /transfers/{id}`; None on a 404."""
        try:
            return self._read(Transfer, self._send("GET", f"/transfers/{_part(id)}", missing_ok=True))
        except Missing:
            return None

    def sent(self) -> frozenset[str]:
        """Every transfer id this client has sent (a transfer, a chain's legs, a post, a void),
        whatever the reply: the ids whose entries an audit can explain."""
        with self._lock:
            return frozenset(self._sent)

    def _sending(self, *transfer_ids: str) -> None:
        with self._lock:
            self._sent.update(transfer_ids)

    # --- the wire ------------------------------------------------------------------

    def _each(self, items: Sequence[Any], call: Any) -> list[Any]:
        def one(item: Any) -> Any:
            try:
                return call(item)
            except LedgerError as error:
                return error

        if len(items) <= 1:
            return [one(item) for item in items]
        with ThreadPoolExecutor(max_workers=min(self._connections, len(items)),
                                thread_name_prefix="remote-ledger") as pool:
            return list(pool.map(one, items))

    def _send(self, method: str, path: str, *, key: str | None = None, body: dict[str, Any] | None = None,
              params: dict[str, Any] | None = None, missing_ok: bool = False) -> Any:
        """One request; the JSON of a 2xx reply, else the error it names raised."""
        where = f"{method} {path}"
        try:
            response = self._client.request(method, path, json=body, params=params,
                                            headers={"Idempotency-Key": key} if key is not None else None)
        except httpx.TimeoutException as error:
            raise ServerUnreachable(f"{where}: no reply within {self._timeout_s:g} s ({error!r}): the outcome is"
                                    " unknown") from error
        except httpx.ConnectError as error:  # (before TransportError, its base)
            raise NotSent(f"{where}: {error!r}: nothing was sent; is `tally serve` running at {self.url}?") from error
        except httpx.TransportError as error:
            raise ServerUnreachable(f"{where}: {error!r}: is `tally serve` running at {self.url}?") from error
        status = response.status_code
        if 200 <= status < 300:
            data = self._json(response, where)
            if key is not None:
                self._check_replay(key, response, where)
            return data
        if status == 401:
            raise self._unexpected(f"{where}: 401: the server " + (
                "refused the bearer token given" if self._token else "wants a bearer token (tally stress --token-file F)"))
        if status == 404 and missing_ok:
            self._json(response, where)  # a 404 still has its error body
            raise Missing
        refusal = self._error(response, where)
        if key is not None and (refusal.code in REJECTIONS or refusal.code == LinkedTransferFailed.code):
            self._check_replay(key, response, where)  # a journaled refusal is replayed as an answer is
        raise refusal


def _part(identifier: str) -> str:
    """An id as one path segment."""
    return quote(identifier, safe="")


def _optional(**fields_: Any) -> dict[str, Any]:
    return {name: dict(value) if isinstance(value, Mapping) else value
            for name, value in fields_.items() if value is not None}


def _transfer_body(request: TransferRequest) -> dict[str, Any]:
    """The body of `POST /transfers` (the id travels as the Idempotency-Key)."""
    body: dict[str, Any] = {"source": request.source, "destination": request.destination, "amount": request.amount}
    if request.code:
        body["code"] = request.code
    if request.pending:
        body["pending"] = True
    return body | _optional(reference=request.reference, metadata=request.metadata, timeout_s=request.timeout_s)
