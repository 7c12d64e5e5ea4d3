"""`tally serve` over real HTTP: a uvicorn server process on a free loopback port, driven by
httpx. Every route, every error status, idempotent replay and conflict, the body rules, the
event stream and its resumption. (Processes stopped and killed: test_serve_process.py.)"""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from serve_support import HTTP_TIMEOUT_S, Server, error_of, write

from engine._serve import HEAD_BYTES_MAX

pytestmark = pytest.mark.timeout(120)

_ids = itertools.count(1)


def fresh(prefix: str) -> str:
    """An id no other test of the module uses (they share one server)."""
    return f"{prefix}-{next(_ids)}"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    home = tmp_path_factory.mktemp("serve")
    running = Server(home / "books", home)
    try:
        yield running
    finally:
        assert running.stop() == 0
        assert "Traceback" not in running.stderr, running.stderr


@pytest.fixture
def client(server: Server) -> Iterator[httpx.Client]:
    with server.client() as opened:
        yield opened


def open_account(client: httpx.Client, prefix: str, currency: str = "USD", **fields: object) -> str:
    account = fresh(prefix)
    response = write(client, "/accounts", account, {"currency": currency, **fields})
    assert response.status_code == 201, response.text
    return account


def funded(client: httpx.Client, amount: int = 1_000) -> tuple[str, str]:
    """A bank (no overdraft bound) and a customer holding `amount` from it."""
    bank = open_account(client, "bank", overdraft_limit=None)
    customer = open_account(client, "alice")
    if amount:
        assert write(client, "/transfers", fresh("fund"),
                     {"source": bank, "destination": customer, "amount": amount}).status_code == 201
    return bank, customer


# --- every route ---------------------------------------------------------------------------


def test_accounts_are_opened_and_read_with_the_python_apis_fields(client: httpx.Client) -> None:
    response = write(client, "/accounts", "shop-1", {"currency": "EUR", "overdraft_limit": 50, "code": 7,
                                                     "metadata": {"mcc": 5411, "name": "corner"}})
    assert response.status_code == 201
    assert "idempotency-replayed" not in response.headers
    expected = {"id": "shop-1", "currency": "EUR", "overdraft_limit": 50, "code": 7,
                "metadata": {"mcc": 5411, "name": "corner"}}
    assert response.json() == expected
    assert client.get("/accounts/shop-1").json() == expected


def test_a_transfer_answers_with_the_transfer_once_durable_and_reads_back(client: httpx.Client) -> None:
    bank, alice = funded(client, 0)
    response = write(client, "/transfers", "pay-1", {"source": bank, "destination": alice, "amount": 250, "code": 3,
                                                     "reference": "order-9", "metadata": {"k": "v"}})
    assert response.status_code == 201
    made = response.json()
    assert set(made) == {"id", "source", "destination", "amount", "lsn", "timestamp", "code", "reference",
                         "metadata", "kind", "pending_id", "status", "timeout_s"}
    assert made["id"] == "pay-1" and made["amount"] == 250 and made["kind"] == "single"
    assert made["status"] == "posted" and made["reference"] == "order-9" and made["metadata"] == {"k": "v"}
    assert client.get("/transfers/pay-1").json() == made
    assert client.get(f"/accounts/{alice}/balance").json() == {"posted": 250, "pending": 0, "available": 250,
                                                              "incoming": 0}
    before = client.get(f"/accounts/{alice}/balance", params={"at_lsn": made["lsn"] - 1}).json()
    assert before["posted"] == 0
    at = client.get(f"/accounts/{alice}/balance", params={"at_timestamp": made["timestamp"]}).json()
    assert at["posted"] == 250


def test_entries_page_by_seq(client: httpx.Client) -> None:
    bank, alice = funded(client, 0)
    for amount in (1, 2, 3):
        assert write(client, "/transfers", fresh("e"), {"source": bank, "destination": alice,
                                                        "amount": amount}).status_code == 201
    first = client.get(f"/accounts/{alice}/entries", params={"limit": 2}).json()["entries"]
    assert [(e["seq"], e["amount"], e["balance"]) for e in first] == [(1, 1, 1), (2, 2, 3)]
    rest = client.get(f"/accounts/{alice}/entries", params={"after": first[-1]["seq"]}).json()["entries"]
    assert [(e["seq"], e["amount"]) for e in rest] == [(3, 3)]
    assert set(rest[0]) == {"account", "seq", "transfer_id", "amount", "balance", "lsn", "timestamp"}


def test_transfers_are_listed_with_the_querys_filters(client: httpx.Client) -> None:
    bank, alice = funded(client, 0)
    ids = [fresh("q") for _ in range(3)]
    for i, transfer_id in enumerate(ids):
        assert write(client, "/transfers", transfer_id, {"source": bank, "destination": alice, "amount": 1,
                                                         "code": 40 + i % 2}).status_code == 201
    listed = client.get("/transfers", params={"account": alice}).json()["transfers"]
    assert [t["id"] for t in listed][-3:] == ids
    newest = client.get("/transfers", params={"account": alice, "reverse": "true", "limit": 1}).json()["transfers"]
    assert [t["id"] for t in newest] == [ids[-1]]
    coded = client.get("/transfers", params={"account": alice, "code": 41}).json()["transfers"]
    assert [t["id"] for t in coded] == [ids[1]]
    after = client.get("/transfers", params={"account": alice, "after_lsn": listed[-2]["lsn"]}).json()["transfers"]
    assert [t["id"] for t in after] == [ids[-1]]
    until = client.get("/transfers", params={"account": alice, "until_lsn": listed[-2]["lsn"]}).json()["transfers"]
    assert ids[-1] not in [t["id"] for t in until]
    assert client.get("/transfers", params={"kind": "pending", "account": alice}).json() == {"transfers": []}


def test_a_pending_transfer_is_posted_in_part_or_voided(client: httpx.Client) -> None:
    bank, alice = funded(client, 1_000)
    shop = open_account(client, "shop")
    hold = write(client, "/transfers", fresh("auth"), {"source": alice, "destination": shop, "amount": 600,
                                                       "pending": True, "timeout_s": 3600}).json()
    assert hold["kind"] == "pending" and hold["status"] == "pending" and hold["timeout_s"] == 3600
    assert client.get(f"/accounts/{alice}/balance").json()["available"] == 400
    posted = write(client, f"/transfers/{hold['id']}/post", fresh("capture"), {"amount": 450, "reference": "r"})
    assert posted.status_code == 201
    assert posted.json()["kind"] == "post" and posted.json()["pending_id"] == hold["id"]
    assert posted.json()["amount"] == 450
    assert client.get(f"/transfers/{hold['id']}").json()["status"] == "posted"
    assert client.get(f"/accounts/{alice}/balance").json() == {"posted": 550, "pending": 0, "available": 550,
                                                              "incoming": 0}
    second = write(client, "/transfers", fresh("auth"), {"source": alice, "destination": shop, "amount": 50,
                                                         "pending": True}).json()
    voided = write(client, f"/transfers/{second['id']}/void", fresh("void"))  # an empty body
    assert voided.status_code == 201 and voided.json()["kind"] == "void" and voided.json()["amount"] == 50
    assert client.get(f"/transfers/{second['id']}").json()["status"] == "voided"
    everything = write(client, "/transfers", fresh("auth"), {"source": alice, "destination": shop, "amount": 5,
                                                             "pending": True}).json()
    assert write(client, f"/transfers/{everything['id']}/post", fresh("capture")).json()["amount"] == 5


def test_a_linked_chain_moves_every_leg_with_ids_from_its_key(client: httpx.Client) -> None:
    bank, alice = funded(client, 100)
    shop = open_account(client, "shop")
    key = fresh("chain")
    response = write(client, "/transfers/linked", key, {"legs": [
        {"source": alice, "destination": shop, "amount": 100},
        {"source": shop, "destination": bank, "amount": 10},
        {"id": f"{key}-fee", "source": shop, "destination": bank, "amount": 1}]})
    assert response.status_code == 201, response.text
    legs = response.json()["transfers"]
    assert [leg["id"] for leg in legs] == [key, f"{key}.1", f"{key}-fee"]
    assert len({leg["lsn"] for leg in legs}) == 1
    assert client.get(f"/accounts/{shop}/balance").json()["posted"] == 89


def test_the_event_stream_ends_at_the_durable_end_without_follow(client: httpx.Client) -> None:
    bank, alice = funded(client, 7)
    lines = client.get("/events", params={"follow": "false"}).text.split("\n\n")
    messages = [block for block in lines if block]
    assert all(block.startswith("id: ") for block in messages)
    events = [json.loads(block.split("\ndata: ", 1)[1]) for block in messages]
    assert [int(block.split("\n", 1)[0][4:]) for block in messages] == [event["lsn"] for event in events]
    assert {"account": {"id": alice, "currency": "USD", "overdraft_limit": 0, "code": 0, "metadata": None}} \
        .items() <= next(e for e in events if e["kind"] == "account" and e["account"]["id"] == alice).items()
    moved = [e for e in events if e["kind"] == "transfer" and e["transfers"][0]["destination"] == alice]
    assert moved[-1]["transfers"][0]["amount"] == 7
    assert [entry["amount"] for entry in moved[-1]["entries"]] == [-7, 7]


def test_the_event_stream_follows_and_resumes_from_last_event_id(server: Server, client: httpx.Client) -> None:
    bank, alice = funded(client, 1)
    end = client.get("/transfers", params={"account": alice}).json()["transfers"][-1]["lsn"]
    first = fresh("sse")
    with client.stream("GET", "/events", params={"after_lsn": end}) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        assert write(client, "/transfers", first, {"source": bank, "destination": alice, "amount": 3}
                     ).status_code == 201
        event_id, data = _next_message(stream.iter_lines())
    assert json.loads(data)["transfers"][0]["id"] == first
    second = fresh("sse")
    assert write(client, "/transfers", second, {"source": bank, "destination": alice, "amount": 4}).status_code == 201
    with client.stream("GET", "/events", params={"after_lsn": 0},  # the header wins over after_lsn
                       headers={"Last-Event-ID": event_id}) as stream:
        _, data = _next_message(stream.iter_lines())
    assert json.loads(data)["transfers"][0]["id"] == second


def test_a_page_past_the_end_is_empty_an_event_stream_past_it_and_a_number_past_every_lsn_are_400(
    client: httpx.Client,
) -> None:
    """A page of transfers after the durable end reads as `Ledger.transfers` reads it: nothing
    yet. The event stream refuses a resume point past it (an id from another ledger, or from
    before a restore, would wait there, then skip what it never saw)."""
    funded(client, 1)
    end = client.get("/transfers", params={"reverse": "true", "limit": 1}).json()["transfers"][0]["lsn"]
    for position in (end + 1, 10**9, 2**64 - 1):
        assert client.get("/transfers", params={"after_lsn": position}).json()["transfers"] == []
        for where in ({"params": {"follow": "false", "after_lsn": position}},
                      {"params": {"follow": "false"}, "headers": {"Last-Event-ID": str(position)}}):
            answer = client.get("/events", **where)  # type: ignore[arg-type]
            assert answer.status_code == 400 and error_of(answer)["code"] == "invalid_request", answer.text
            assert f"last durable LSN is {end}" in error_of(answer)["message"], answer.text
    answer = client.get("/events", params={"follow": "false", "after_lsn": end})
    assert answer.status_code == 200 and answer.text == "", answer.text
    for path, name in (("/transfers", "after_lsn"), ("/transfers", "until_lsn"), ("/events", "after_lsn")):
        answer = client.get(path, params={"follow": "false", name: 2**64} if path == "/events" else {name: 2**64})
        assert answer.status_code == 400 and error_of(answer)["code"] == "invalid_request", answer.text
    answer = client.get("/events", params={"follow": "false"}, headers={"Last-Event-ID": str(2**64)})
    assert answer.status_code == 400 and error_of(answer)["code"] == "invalid_request", answer.text


def _next_message(lines: Iterator[str]) -> tuple[str, str]:
    """The `id` and `data` of the next SSE message (comment lines skipped)."""
    event_id = data = None
    for line in lines:
        if line.startswith("id: "):
            event_id = line[4:]
        elif line.startswith("data: "):
            data = line[6:]
        elif line == "" and data is not None:
            break
    assert event_id is not None and data is not None
    return event_id, data


def test_health_and_the_openapi_document_are_served(client: httpx.Client) -> None:
    assert client.get("/health").json() == {"status": "ok"}
    schema = client.get("/openapi.json").json()
    assert {"/accounts", "/transfers", "/transfers/linked", "/events", "/health"} <= set(schema["paths"])
    assert client.get("/docs").status_code == 200


# --- idempotency -----------------------------------------------------------------------------


def test_a_retry_with_the_same_key_and_body_replays_the_original_answer(client: httpx.Client) -> None:
    bank, alice = funded(client, 0)
    key = fresh("retry")
    body = {"source": bank, "destination": alice, "amount": 5}
    original = write(client, "/transfers", key, body)
    replay = write(client, "/transfers", key, dict(body, id=key))
    assert (replay.status_code, replay.json()) == (original.status_code, original.json())
    assert replay.headers["idempotency-replayed"] == "true"
    assert client.get(f"/accounts/{alice}/balance").json()["posted"] == 5  # moved once
    hold = write(client, "/transfers", fresh("hold"), {"source": bank, "destination": alice, "amount": 9,
                                                       "pending": True}).json()["id"]
    chain = {"legs": [{"source": bank, "destination": alice, "amount": 1},
                      {"source": alice, "destination": bank, "amount": 1}]}
    for path, key, sent in ((f"/transfers/{hold}/post", fresh("capture"), {"amount": 4}),
                            ("/transfers/linked", fresh("chain"), chain)):
        original = write(client, path, key, sent)
        replay = write(client, path, key, sent)
        assert original.status_code == 201 and "idempotency-replayed" not in original.headers
        assert (replay.status_code, replay.json(), replay.headers["idempotency-replayed"]) == (
            201, original.json(), "true")
    assert client.get(f"/accounts/{alice}/balance").json()["posted"] == 5 + 4  # each moved once
    account = fresh("acct")
    assert "idempotency-replayed" not in write(client, "/accounts", account, {"currency": "USD"}).headers
    again = write(client, "/accounts", account, {"currency": "USD"})
    assert again.status_code == 201 and again.headers["idempotency-replayed"] == "true"


def test_a_replayed_refusal_has_the_same_status_and_body(client: httpx.Client) -> None:
    bank, alice = funded(client, 10)
    for path, key, body in (
        ("/transfers", fresh("broke"), {"source": alice, "destination": bank, "amount": 11}),
        ("/transfers", fresh("nobody"), {"source": alice, "destination": "no-such-account", "amount": 1}),
        ("/transfers/linked", fresh("chain"), {"legs": [{"source": bank, "destination": alice, "amount": 1},
                                                        {"source": alice, "destination": bank, "amount": 99}]}),
        ("/transfers/no-such-hold/post", fresh("post"), None),
    ):
        original = write(client, path, key, body)
        replay = write(client, path, key, body)
        assert original.status_code in (404, 422)
        assert (replay.status_code, replay.json()) == (original.status_code, original.json())
        assert "idempotency-replayed" not in original.headers
        assert replay.headers["idempotency-replayed"] == "true"


def test_a_different_body_under_a_used_key_is_a_409_conflict(client: httpx.Client) -> None:
    bank, alice = funded(client, 10)
    key = fresh("once")
    assert write(client, "/transfers", key, {"source": bank, "destination": alice, "amount": 1}).status_code == 201
    for path, body in (("/transfers", {"source": bank, "destination": alice, "amount": 2}),
                       ("/transfers/linked", {"legs": [{"source": bank, "destination": alice, "amount": 1}]}),
                       (f"/transfers/{key}/void", None)):
        conflict = write(client, path, key, body)
        assert conflict.status_code == 409 and error_of(conflict)["code"] == "idempotency_conflict"
        assert "idempotency-replayed" not in conflict.headers
    refused = fresh("refused")
    assert write(client, "/transfers", refused, {"source": alice, "destination": bank, "amount": 99}
                 ).status_code == 422
    conflict = write(client, "/transfers", refused, {"source": alice, "destination": bank, "amount": 1})
    assert error_of(conflict)["code"] == "idempotency_conflict"
    account = open_account(client, "acct")
    exists = write(client, "/accounts", account, {"currency": "EUR"})
    assert exists.status_code == 409 and error_of(exists)["code"] == "account_exists"


def test_a_conflicts_message_says_what_differs_when_only_the_chain_does(client: httpx.Client) -> None:
    bank, alice = funded(client, 10)
    leg = {"source": bank, "destination": alice, "amount": 1}
    single, chained = fresh("single"), fresh("chained")
    assert write(client, "/transfers", single, leg).status_code == 201
    assert write(client, "/transfers/linked", chained, {"legs": [leg, leg]}).status_code == 201
    for key, legs in ((single, [leg]), (chained, [leg])):  # the same first leg, in another chain or none
        conflict = write(client, "/transfers/linked", key, {"legs": legs})
        assert conflict.status_code == 409 and error_of(conflict)["code"] == "idempotency_conflict"
        message = str(error_of(conflict)["message"])
        assert not message.rstrip().endswith("differs in") and "linked chain" in message, message


def test_concurrent_requests_with_one_key_are_an_original_and_replays(server: Server, client: httpx.Client) -> None:
    import concurrent.futures

    bank, alice = funded(client, 0)
    key = fresh("race")
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: write(client, "/transfers", key,
                                                {"source": bank, "destination": alice, "amount": 1}), range(8)))
    assert {answer.status_code for answer in answers} == {201}
    assert sorted(answer.headers.get("idempotency-replayed", "false") for answer in answers) == ["false"] + ["true"] * 7
    assert client.get(f"/accounts/{alice}/balance").json()["posted"] == 1


def test_a_write_needs_an_idempotency_key_that_agrees_with_the_body(client: httpx.Client) -> None:
    bank, alice = funded(client, 10)
    body = {"source": bank, "destination": alice, "amount": 1}
    for path, key, sent in (("/transfers", None, body), ("/accounts", None, {"currency": "USD"}),
                            ("/transfers/linked", None, {"legs": [body]}), ("/transfers/x/post", None, None),
                            ("/transfers/x/void", None, None),
                            ("/transfers", "k-1", dict(body, id="k-2")),
                            ("/accounts", "a-1", {"id": "a-2", "currency": "USD"}),
                            ("/transfers/linked", "c-1", {"legs": [dict(body, id="c-2")]})):
        refused = write(client, path, key, sent)
        assert refused.status_code == 400, (path, refused.text)
        assert error_of(refused)["code"] == "invalid_request"
        assert "Idempotency-Key" in str(error_of(refused)["message"])
    assert client.get(f"/accounts/{alice}/balance").json()["posted"] == 10


def test_ids_may_hold_any_character_a_percent_encoded_path_carries(client: httpx.Client) -> None:
    bank, alice = funded(client, 10)
    odd = "a/b c?d%e#\N{SNOWMAN}"
    assert write(client, "/accounts", odd.encode(), {"id": odd, "currency": "USD"}).status_code == 201
    assert client.get(f"/accounts/{quote(odd, safe='')}").json()["id"] == odd
    assert client.get(f"/accounts/{quote(odd, safe='')}/balance").json()["posted"] == 0
    hold = write(client, "/transfers", odd.encode(), {"source": alice, "destination": bank, "amount": 1,
                                                      "pending": True})
    assert hold.status_code == 201 and hold.json()["id"] == odd
    path = f"/transfers/{quote(odd, safe='')}"
    assert client.get(path).json()["id"] == odd
    assert write(client, path + "/void", fresh("v")).json()["pending_id"] == odd


def test_an_account_whose_id_ends_in_a_routes_name_is_read_as_itself(client: httpx.Client) -> None:
    """`/accounts/x%2Fbalance` is the account "x/balance", not the balance of "x": the routes
    match the decoded path, where the encoded `/` looks like the route's own."""
    bank, alice = funded(client, 10)
    for route in ("balance", "entries"):
        odd = f"{alice}/{route}"
        assert write(client, "/accounts", odd.encode(), {"currency": "EUR"}).status_code == 201
        read = client.get(f"/accounts/{quote(odd, safe='')}")
        assert read.status_code == 200 and read.json()["id"] == odd and read.json()["currency"] == "EUR", read.text
        assert client.get(f"/accounts/{quote(odd, safe='')}/{route}").status_code == 200
    assert client.get(f"/accounts/{quote(alice, safe='')}/balance").json()["posted"] == 10  # the route, spelled out
    assert client.get(f"/accounts/{alice}/%65ntries").json()["entries"][0]["amount"] == 10  # the route, encoded


def test_two_different_idempotency_keys_are_400_and_write_nothing(client: httpx.Client) -> None:
    bank, alice = funded(client, 10)
    first, second = fresh("two"), fresh("two")
    refused = client.post("/transfers", json={"source": alice, "destination": bank, "amount": 1},
                          headers=[("Idempotency-Key", first), ("Idempotency-Key", second)])
    assert refused.status_code == 400 and error_of(refused)["code"] == "invalid_request", refused.text
    assert "Idempotency-Key" in str(error_of(refused)["message"])
    assert client.get(f"/transfers/{first}").status_code == 404
    assert client.get(f"/transfers/{second}").status_code == 404
    assert client.get(f"/accounts/{alice}/balance").json()["posted"] == 10


def test_a_key_that_is_no_id_is_400(client: httpx.Client) -> None:
    bank, alice = funded(client, 10)
    body = {"source": bank, "destination": alice, "amount": 1}
    for key in ("k" * 129, b"\xff\xfe"):  # too long; not UTF-8
        refused = write(client, "/transfers", key, body)
        assert refused.status_code == 400 and error_of(refused)["code"] == "invalid_request"


# --- errors ------------------------------------------------------------------------------------


def test_each_failure_has_its_status_and_code(client: httpx.Client) -> None:
    bank, alice = funded(client, 10)
    euro = open_account(client, "euro", currency="EUR")
    hold = write(client, "/transfers", fresh("h"), {"source": alice, "destination": bank, "amount": 5,
                                                    "pending": True}).json()["id"]
    assert write(client, f"/transfers/{hold}/void", fresh("v")).status_code == 201
    cases = [
        (client.get("/accounts/nobody"), 404, "account_not_found"),
        (client.get("/accounts/nobody/balance"), 404, "account_not_found"),
        (client.get("/accounts/nobody/entries"), 404, "account_not_found"),
        (client.get("/transfers/nothing"), 404, "transfer_not_found"),
        (client.get("/no/such/route"), 404, "not_found"),
        (client.delete("/accounts"), 405, "method_not_allowed"),
        (write(client, "/transfers", fresh("t"), {"source": bank, "destination": "nobody", "amount": 1}), 404,
         "account_not_found"),
        (write(client, "/transfers", fresh("t"), {"source": alice, "destination": bank, "amount": 11}), 422,
         "insufficient_funds"),
        (write(client, "/transfers", fresh("t"), {"source": bank, "destination": euro, "amount": 1}), 422,
         "currency_mismatch"),
        (write(client, "/transfers/nothing/post", fresh("p")), 422, "pending_transfer_not_found"),
        (write(client, f"/transfers/{hold}/post", fresh("p")), 422, "pending_transfer_already_voided"),
        (write(client, "/transfers", fresh("t"), {"source": bank, "destination": alice, "amount": 0}), 400,
         "invalid_request"),
        (client.get("/transfers", params={"kind": "sideways"}), 400, "invalid_request"),
        (client.get("/transfers", params={"limit": 0}), 400, "invalid_request"),
        (client.get(f"/accounts/{alice}/balance", params={"at_lsn": 1, "at_timestamp": 1}), 400, "invalid_request"),
        (client.get(f"/accounts/{alice}/balance", params={"at_lsn": 2**62}), 400, "invalid_request"),
        (client.get("/events", params={"after_lsn": 2**62}), 400, "invalid_request"),
        (client.get("/events", params={"after_lsn": 2**64}), 400, "invalid_request"),
        (client.get("/events", headers={"Last-Event-ID": "yesterday"}), 400, "invalid_request"),
    ]
    for response, status, code in cases:
        assert (response.status_code, error_of(response)["code"]) == (status, code), response.request.url


@pytest.mark.parametrize("path", ["/health/", "/events/", "/openapi.json/", "/docs/"])
def test_a_path_with_a_trailing_slash_is_no_route_not_a_redirect(client: httpx.Client, path: str) -> None:
    answer = client.get(path)
    assert answer.status_code == 404, (answer.status_code, answer.headers)
    assert error_of(answer) == {"code": "not_found", "message": f"no route GET {path}"}


def test_a_refused_linked_chain_names_the_leg_and_its_cause(client: httpx.Client) -> None:
    bank, alice = funded(client, 10)
    refused = write(client, "/transfers/linked", fresh("chain"), {"legs": [
        {"source": bank, "destination": alice, "amount": 1},
        {"source": alice, "destination": bank, "amount": 1_000}]})
    assert refused.status_code == 422
    error = error_of(refused)
    assert error["code"] == "linked_transfer_failed" and error["index"] == 1
    assert isinstance(error["cause"], dict) and error["cause"]["code"] == "insufficient_funds"
    assert client.get(f"/accounts/{alice}/balance").json()["posted"] == 10  # nothing moved


MALFORMED: list[tuple[str, str | bytes, dict[str, str]]] = [
    ("a float amount", '{"source": "s", "destination": "d", "amount": 10.0}', {}),
    ("a string amount", '{"source": "s", "destination": "d", "amount": "10"}', {}),
    ("a bool amount", '{"source": "s", "destination": "d", "amount": true}', {}),
    ("a null amount", '{"source": "s", "destination": "d", "amount": null}', {}),
    ("a NaN amount", '{"source": "s", "destination": "d", "amount": NaN}', {}),
    ("a huge amount", '{"source": "s", "destination": "d", "amount": 18446744073709551616}', {}),
    ("a negative amount", '{"source": "s", "destination": "d", "amount": -1}', {}),
    ("an unknown field", '{"source": "s", "destination": "d", "amount": 1, "amonut": 1}', {}),
    ("a missing field", '{"source": "s", "amount": 1}', {}),
    ("a number for an id", '{"source": 1, "destination": "d", "amount": 1}', {}),
    ("a nested metadata value", '{"source": "s", "destination": "d", "amount": 1, "metadata": {"a": {}}}', {}),
    ("a float metadata value", '{"source": "s", "destination": "d", "amount": 1, "metadata": {"a": 1.5}}', {}),
    ("a string pending", '{"source": "s", "destination": "d", "amount": 1, "pending": "yes"}', {}),
    ("broken JSON", '{"source": "s", ', {}),
    ("not JSON", "amount=1", {}),
    ("an array", "[1, 2]", {}),
    ("a bare string", '"transfer"', {}),
    ("null", "null", {}),
    ("an empty body", "", {}),
    ("invalid UTF-8", b'{"source": "\xff"}', {}),
    ("a form's content type", '{"source": "s", "destination": "d", "amount": 1}',
     {"Content-Type": "application/x-www-form-urlencoded"}),
    ("no content type", '{"source": "s", "destination": "d", "amount": 1}', {"Content-Type": ""}),
    ("deep nesting", "[" * 10_000 + "]" * 10_000, {}),
    ("a key given twice", '{"source": "s", "destination": "d", "amount": 1, "amount": 2}', {}),
    ("a key given twice in metadata", '{"source": "s", "destination": "d", "amount": 1, "metadata": {"a": "1", '
                                      '"a": "2"}}', {}),
]


@pytest.mark.parametrize("what, body, headers", MALFORMED, ids=[case[0] for case in MALFORMED])
def test_a_malformed_transfer_is_400_and_changes_nothing(client: httpx.Client, what: str, body: str | bytes,
                                                         headers: dict[str, str]) -> None:
    key = fresh("bad")
    sent = {"Content-Type": "application/json", "Idempotency-Key": key, **headers}
    response = client.post("/transfers", content=body, headers={k: v for k, v in sent.items() if v})
    assert response.status_code == 400, response.text
    assert error_of(response)["code"] == "invalid_request"
    assert "Traceback" not in response.text
    assert client.get(f"/transfers/{key}").status_code == 404


def test_malformed_linked_post_and_account_bodies_are_400(client: httpx.Client) -> None:
    for path, body in (("/transfers/linked", {"legs": []}), ("/transfers/linked", {"legs": "all"}),
                       ("/transfers/linked", [{"source": "s", "destination": "d", "amount": 1}]),
                       ("/transfers/linked", {"legs": [{"source": "s", "destination": "d", "amount": 1.5}]}),
                       ("/transfers/x/post", {"amount": "all"}), ("/transfers/x/post", {"pending_id": "y"}),
                       ("/transfers/x/void", {"amount": 1}), ("/accounts", {"currency": "USD", "limit": 1}),
                       ("/accounts", {"currency": "USD", "overdraft_limit": 1.0}), ("/accounts", {})):
        response = write(client, path, fresh("bad"), body)
        assert response.status_code == 400, (path, body, response.text)
        assert error_of(response)["code"] == "invalid_request"


FLOODS: list[tuple[str, bytes, str]] = [
    ("/transfers/linked", b'{"legs": [' + b",".join([b"{}"] * 300_000) + b"]}",
     "body.legs: at most 1000 legs, got 300000"),
    ("/transfers", b"{" + b", ".join(b'"x%d": 1' % i for i in range(80_000)) + b"}",
     "body: 80000 members, more than the fields it takes: id, source, destination, amount"),
    ("/transfers", b'{"source": "s", "destination": "d", "amount": 1, "metadata": {'
     + b",".join(b'"k%d":{}' % i for i in range(80_000)) + b"}}", "body.metadata: at most 16 keys, got 80000"),
    ("/accounts", b'{"currency": "USD", "metadata": {' + b", ".join(b'"k%d": {}' % i for i in range(17)) + b"}}",
     "body.metadata: at most 16 keys, got 17"),
    ("/transfers/linked", b'{"legs": [' + b", ".join([b'{"source": "s", "destination": "d", "amount": 1}'] * 5
                                                     + [b"{}"] * 900) + b"]}", "body.legs.5.source: Field required"),
]


@pytest.mark.parametrize("path, body, problem", FLOODS, ids=["legs", "members", "metadata", "17 keys", "bad legs"])
def test_a_body_of_many_bad_items_is_one_problem_found_before_they_are_validated(
        client: httpx.Client, path: str, body: bytes, problem: str) -> None:
    """A body under the size limit may hold 300,000 legs or members: were each validated and
    named, the server's loop would be busy for seconds (every request waiting, /health too).
    Their count is checked first, and a chain's legs are validated up to the first bad one."""
    assert len(body) < 1 << 20
    key = fresh("flood")
    answer = client.post(path, content=body, headers={"Idempotency-Key": key, "Content-Type": "application/json"})
    assert answer.status_code == 400, answer.text
    message = str(error_of(answer)["message"])
    assert message.startswith(problem) and "; and " not in message, message
    assert client.get(f"/transfers/{key}").status_code == 404


def test_a_400_names_its_first_problems_without_reading_the_rest() -> None:
    from collections.abc import Sequence

    from fastapi.exceptions import RequestValidationError

    from engine import _serve_app

    read: list[int] = []

    class Problems(Sequence[dict[str, object]]):
        def __len__(self) -> int:
            return 1_000_000

        def __getitem__(self, at: Any) -> Any:
            if isinstance(at, slice):
                return [self[i] for i in range(*at.indices(len(self)))]
            read.append(at)
            return {"loc": ("body", "legs", at), "msg": "Field required", "type": "missing"}

    answer = asyncio.run(_serve_app._invalid(None, RequestValidationError(Problems())))  # type: ignore[arg-type]
    assert json.loads(answer.body)["error"]["message"].endswith("; and 999990 more")
    assert len(read) == _serve_app.VALIDATION_ERRORS_SHOWN_MAX


def test_a_body_over_the_limit_is_413_and_a_chain_of_1000_legs_fits(client: httpx.Client) -> None:
    oversized = client.post("/transfers", headers={"Idempotency-Key": fresh("big"), "Content-Type":
                                                   "application/json"}, content=b" " * (1 << 20) + b"{}")
    assert oversized.status_code == 413 and error_of(oversized)["code"] == "body_too_large"
    streamed = client.post("/transfers", headers={"Idempotency-Key": fresh("big"), "Content-Type":
                                                  "application/json"},
                           content=iter([b" " * (1 << 19)] * 3))  # chunked: no Content-Length
    assert streamed.status_code == 413 and error_of(streamed)["code"] == "body_too_large"
    source, destination = (open_account(client, "s" * 120, overdraft_limit=None), open_account(client, "d" * 120))
    assert 120 < len(source) <= 128
    key = "c" * 123
    legs = [{"id": f"{key}.{i:04}", "source": source, "destination": destination, "amount": 1,
             "reference": "r" * 256} for i in range(1000)]
    legs[0]["id"] = key
    chain = write(client, "/transfers/linked", key, {"legs": legs})
    assert len(chain.request.content) > 680_000  # about 700 bytes a leg
    assert chain.status_code == 201, chain.text
    assert len(chain.json()["transfers"]) == 1000


def test_a_request_head_over_the_limit_is_431_and_closed_not_buffered_without_end(server: Server,
                                                                                 client: httpx.Client) -> None:
    """A header that never ends (or a thousand of them) would be held in memory as it
    arrives, before the token is checked: past `HEAD_BYTES_MAX` the answer is 431 and the
    connection is closed, whatever follows. A large head under the limit is served."""
    host, port = httpx.URL(server.url).host, httpx.URL(server.url).port
    assert port is not None
    with socket.create_connection((host, port), timeout=HTTP_TIMEOUT_S) as connection:
        connection.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Filler: " + b"f" * HEAD_BYTES_MAX)
        connection.shutdown(socket.SHUT_WR)  # (unfixed, the server waits for the head's end: EOF ends that)
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431 "), answer[:200]
    assert b"connection: close" in head.lower()
    assert json.loads(body)["error"]["code"] == "headers_too_large"
    fillers = {f"X-Filler-{n}": "f" * 100 for n in range(HEAD_BYTES_MAX // 200)}  # half the limit
    assert client.get("/health", headers=fillers).status_code == 200


def test_a_pipelined_request_does_not_count_the_head_before_it_toward_its_own(server: Server) -> None:
    """Two heads, each under `HEAD_BYTES_MAX` but together over it, sent at once: the first
    (whole) and the start of the second arrive in one chunk. The second's bound counts its own
    bytes, not the chunk's: both are served, in order (it was a 431, closing the connection,
    for a client that had sent nothing over the limit, and the first request went unanswered)."""
    host, port = httpx.URL(server.url).host, httpx.URL(server.url).port
    assert port is not None
    first = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Filler: " + b"f" * (HEAD_BYTES_MAX - 4096) + b"\r\n\r\n"
    second = b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Filler: " + b"g" * 8192
    with socket.create_connection((host, port), timeout=HTTP_TIMEOUT_S) as connection:
        connection.sendall(first + second)
        answer = connection.recv(65536)
        assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
        connection.sendall(b"\r\n\r\n")
        while chunk := connection.recv(65536):
            answer += chunk
    assert answer.count(b"HTTP/1.1 200 ") == 2, answer[:400]


class _PlainServer:
    """uvicorn on a free loopback port in a thread, with `tally serve`'s protocol
    (`_bounded_head_protocol`) and an application that answers 200 "ok" to every request."""

    def __init__(self) -> None:
        import threading

        import uvicorn

        from engine._serve import _bounded_head_protocol

        async def ok(scope: dict[str, Any], receive: Any, send: Any) -> None:
            assert scope["type"] == "http"
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
            await send({"type": "http.response.body", "body": b"ok"})

        self.listening = socket.create_server(("127.0.0.1", 0))
        self.port = self.listening.getsockname()[1]
        config = uvicorn.Config(ok, lifespan="off", http=_bounded_head_protocol(), log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.listening]}, daemon=True)
        self.thread.start()
        deadline = HTTP_TIMEOUT_S
        while not self.server.started:  # (the flag uvicorn sets once it listens)
            assert self.thread.is_alive() and deadline > 0, "the server did not start"
            deadline -= 0.01
            self.thread.join(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(HTTP_TIMEOUT_S)
        self.listening.close()
        assert not self.thread.is_alive()


def _until_closed(connection: socket.socket) -> bytes:
    """What the server sends until it closes the connection (each read bounded by the socket's timeout)."""
    answer = b""
    while chunk := connection.recv(65536):
        answer += chunk
    return answer


def test_a_request_head_that_does_not_arrive_in_time_is_a_408_and_a_silent_connection_is_closed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A client that opens connections and sends nothing, or a head it never ends, must not
    hold them for ever (uvicorn's own keep-alive timer runs only after a response): past
    `HEAD_READ_S` a head begun is answered 408 and closed, a silent connection closed; on a
    kept-alive connection the next head is bounded too, from its first byte."""
    from engine import _serve

    monkeypatch.setattr(_serve, "HEAD_READ_S", 0.3)
    server = _PlainServer()
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=HTTP_TIMEOUT_S) as silent:
            assert _until_closed(silent) == b""  # closed: no request, no answer
        with socket.create_connection(("127.0.0.1", server.port), timeout=HTTP_TIMEOUT_S) as slow:
            slow.sendall(b"POST /transfers HTTP/1.1\r\nHost: x\r\n")
            head, _, body = _until_closed(slow).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408 "), head
        assert b"connection: close" in head.lower()
        assert json.loads(body)["error"]["code"] == "request_timeout"
        with socket.create_connection(("127.0.0.1", server.port), timeout=HTTP_TIMEOUT_S) as kept:
            kept.sendall(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
            first = b""
            while not first.endswith(b"ok"):  # (its head and its body may come in two reads)
                chunk = kept.recv(65536)
                assert chunk, first
                first += chunk
            assert first.startswith(b"HTTP/1.1 200 "), first
            kept.sendall(b"GET /b HTTP/1.1\r\n")  # the next head, never ended
            head, _, body = _until_closed(kept).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408 "), head
    finally:
        server.stop()


def test_a_head_in_time_is_served_whatever_the_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    """The bound cuts only a head that is late: requests whose heads arrive whole are
    answered, one after another on a kept-alive connection, pipelined ones too."""
    from engine import _serve

    monkeypatch.setattr(_serve, "HEAD_READ_S", HTTP_TIMEOUT_S)
    server = _PlainServer()
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=HTTP_TIMEOUT_S) as connection:
            connection.sendall(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n"
                               b"Connection: close\r\n\r\n")
            answer = _until_closed(connection)
        assert answer.count(b"HTTP/1.1 200 ") == 2, answer
    finally:
        server.stop()


class _Transport:
    """What `tally serve`'s protocol writes to, and whether it closed."""

    def __init__(self) -> None:
        self.written, self.closed = b"", False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def is_closing(self) -> bool:
        return self.closed

    def write(self, data: bytes) -> None:
        self.written += data

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


@pytest.fixture
def protocol(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Any, _Transport, asyncio.AbstractEventLoop]]:
    """`tally serve`'s protocol on a connection, its loop not running: its timers are only
    scheduled (each `when()` read, none fired), and a request's application never runs."""
    import uvicorn
    from uvicorn.server import ServerState

    from engine import _serve

    monkeypatch.setattr(_serve, "HEAD_READ_S", 30.0)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("never run")

    config = uvicorn.Config(app, lifespan="off", http=_serve._bounded_head_protocol(), log_level="warning")
    config.load()
    loop = asyncio.new_event_loop()
    made = config.http_protocol_class(config=config, server_state=ServerState(), app_state={}, _loop=loop)
    transport = _Transport()
    made.connection_made(transport)
    try:
        yield made, transport, loop
    finally:
        tasks = asyncio.all_tasks(loop)
        for task in tasks:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        loop.close()


def _answered(made: Any) -> None:
    """The response to the request under way has gone out (as uvicorn marks it)."""
    made.cycle.response_complete = True
    made.on_response_complete()


def test_a_byte_during_a_response_does_not_start_the_next_heads_time(
        protocol: tuple[Any, _Transport, asyncio.AbstractEventLoop]) -> None:
    """A stray line break while a response is under way started the next head's time then:
    after a long response, that head had little or none of it."""
    made, transport, loop = protocol
    made.data_received(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
    assert made.head_timer is None  # a whole head: its time stops
    made.data_received(b"\r\n")  # while the response is under way
    assert made.head_timer is None
    _answered(made)
    assert made.head_timer is None  # (the idle connection is uvicorn's keep-alive timer's)
    made.data_received(b"GET /b HTTP/1.1\r\n")  # the next head's first bytes: its time starts
    assert made.head_timer is not None and made.head_timer.when() >= loop.time() + 29
    assert not transport.closed and transport.written == b""


def test_a_request_answered_before_its_body_came_has_a_bound_for_the_rest(
        protocol: tuple[Any, _Transport, asyncio.AbstractEventLoop]) -> None:
    """A request answered without reading its body (a 401, a 413 by its Content-Length): the
    body's bytes, which uvicorn reads and drops, stop its keep-alive timer, so a client could
    hold the connection by trickling them. The rest must come within `HEAD_READ_S`, or the
    connection closes (no 408: the request was answered); once it came, the connection waits
    for a head, bounded too."""
    made, transport, _ = protocol
    made.data_received(b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789")
    _answered(made)
    assert made.head_timer is not None
    made.data_received(b"0123456789")  # a trickle does not move the bound
    made._head_late()  # (its time passed)
    assert transport.closed and transport.written == b""

    made2 = type(made)(config=made.config, server_state=made.server_state, app_state={}, _loop=made.loop)
    transport2 = _Transport()
    made2.connection_made(transport2)
    made2.data_received(b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 20\r\n\r\n0123456789")
    _answered(made2)
    made2.data_received(b"0123456789")  # the rest came: the connection waits for a head now, bounded
    idle = made2.timeout_keep_alive_task  # (as after any response: uvicorn's keep-alive wait, begun again)
    assert idle is not None and made2.head_timer is None and not made2.in_head and made2.between
    made2.data_received(b"GET /b HTTP/1.1\r\n")  # the next head's first byte starts its own time
    began = made2.head_timer
    assert began is not None and began.when() >= made2.loop.time() + 29 and idle.cancelled()
    made2.data_received(b"Host: x\r\n")  # (its later bytes do not)
    assert made2.head_timer is began
    made2._head_late()
    assert transport2.closed and b" 408 " in transport2.written


def test_a_405_names_every_method_its_path_takes_and_head_checks_health(client: httpx.Client) -> None:
    """`Allow` lists the methods of every route of the path (`POST /transfers` is listed
    before `GET /transfers`, and Starlette names only the first's), never one the server
    refuses; `HEAD /health` (a load balancer's check) is a 200 without a body."""
    for method, path, allowed in (("DELETE", "/transfers", "GET, POST"), ("PUT", "/transfers", "GET, POST"),
                                  ("DELETE", "/accounts", "POST"), ("POST", "/health", "GET, HEAD"),
                                  ("DELETE", "/transfers/x", "GET")):
        answer = client.request(method, path)
        assert answer.status_code == 405, (method, path, answer.text)
        assert answer.headers["allow"] == allowed, (method, path)
        assert error_of(answer)["code"] == "method_not_allowed"
    checked = client.head("/health")
    assert checked.status_code == 200 and checked.content == b""


def test_the_server_uses_only_the_public_names_of_engine() -> None:
    """It is the reference host: what it does, any host can do with `from engine import ...`."""
    import ast

    import engine

    root = Path(engine.__file__).parent
    modules = sorted(root.glob("_serve*.py"))
    assert len(modules) >= 4
    for module in modules:
        tree = ast.parse(module.read_text(), filename=str(module))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert node.module.split(".")[0] not in ("coordinator", "journal"), (module.name, node.module)
                if node.module == "engine":
                    assert {alias.name for alias in node.names} <= set(engine.__all__), module.name
                elif node.module.startswith("engine"):
                    assert node.module.startswith("engine._serve"), (module.name, node.module)
            elif isinstance(node, ast.Import):
                assert not {alias.name.split(".")[0] for alias in node.names} & {"coordinator", "journal"}
            elif (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                  and not (isinstance(node.value, ast.Name) and node.value.id == "self")):
                raise AssertionError(f"{module.name}:{node.lineno} reads a private name, .{node.attr}")


def test_at_stop_a_connection_is_closed_only_once_its_client_stopped_reading(monkeypatch: pytest.MonkeyPatch) -> None:
    """`tally serve`'s watch at stop: a connection whose unsent bytes (its transport's and
    its socket's) stay still is closed; one whose client drains its socket, however slowly,
    or that holds nothing, is left to finish."""
    import engine._serve as serve

    monkeypatch.setattr(serve, "STALLED_S", 0.2)
    monkeypatch.setattr(serve, "_socket_queue", lambda transport: transport.queued())

    class Transport:
        def __init__(self, waiting: int, queue: Iterator[int]) -> None:
            self.waiting, self.queue, self.aborted = waiting, queue, asyncio.Event()

        def get_write_buffer_size(self) -> int:
            return self.waiting

        def queued(self) -> int:
            return next(self.queue)

        def abort(self) -> None:
            self.aborted.set()

    class Connection:
        def __init__(self, transport: Transport) -> None:
            self.transport, self.client = transport, ("127.0.0.1", 1)

    reading = Transport(65_536, itertools.count(10**9, -1))  # its socket drains, a byte a look
    stopped = Transport(65_536, itertools.repeat(10**6))
    idle = Transport(0, itertools.repeat(0))

    async def watch() -> None:
        watching = asyncio.ensure_future(serve._close_stalled({Connection(t) for t in (reading, stopped, idle)}))
        try:
            await asyncio.wait_for(stopped.aborted.wait(), 10)
        finally:
            watching.cancel()
            await asyncio.gather(watching, return_exceptions=True)

    asyncio.run(watch())
    assert not reading.aborted.is_set() and not idle.aborted.is_set()


# --- the guard in front of every route, in process -------------------------------------------

def _scope(method: str, path: str, headers: list[tuple[bytes, bytes]]) -> dict[str, object]:
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
            "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"", "headers": headers,
            "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000)}


def _served(app: object, scope: dict[str, object], receive: object) -> list[dict[str, object]]:
    sent: list[dict[str, object]] = []

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    asyncio.run(asyncio.wait_for(app(scope, receive, send), 10))  # type: ignore[operator]
    return sent


def test_a_body_that_does_not_arrive_in_time_is_a_408(monkeypatch: pytest.MonkeyPatch) -> None:
    """A client that sends a write's headers and never its body must not hold its place among
    the requests in flight for ever (enough of them and every request is 503)."""
    from engine import _serve_app

    monkeypatch.setattr(_serve_app, "BODY_READ_S", 0.2)
    app = _serve_app.build_app("unopened", None, 1 << 20, {})  # no lifespan: the body never reaches a route

    async def never() -> dict[str, object]:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    headers = [(b"content-type", b"application/json"), (b"content-length", b"50"), (b"idempotency-key", b"t1")]
    sent = _served(app, _scope("POST", "/transfers", headers), never)
    assert sent[0]["status"] == 408
    assert (b"connection", b"close") in sent[0]["headers"]  # type: ignore[operator]
    assert json.loads(sent[1]["body"])["error"]["code"] == "request_timeout"  # type: ignore[arg-type]


def test_once_answered_a_request_waits_for_its_client_to_leave_without_a_bound(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An event stream answers before reading a body its request declared and never sent;
    what it then waits for is the client leaving: no 408 may cut it."""
    from engine import _serve_app

    monkeypatch.setattr(_serve_app, "BODY_READ_S", 0.1)
    left = asyncio.Event()

    async def stream(scope: object, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        waiting = asyncio.ensure_future(receive())
        await asyncio.sleep(0.3)  # past the body's bound
        assert not waiting.done()
        left.set()
        assert (await waiting)["type"] == "http.disconnect"
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def client_leaves_late() -> dict[str, object]:
        await left.wait()
        return {"type": "http.disconnect"}

    guard = _serve_app.Guard(stream, token=None, body_bytes_max=100)  # type: ignore[arg-type]
    headers = [(b"content-length", b"10")]
    assert [m["type"] for m in _served(guard, _scope("GET", "/events", headers), client_leaves_late)] == [
        "http.response.start", "http.response.body"]


def test_once_stopping_a_body_sent_in_pieces_gets_the_stops_bound_on_every_later_read(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A client trickling its body must not keep the stop waiting for the whole body bound:
    the read after the signal is bounded by the stop's, not only the one under way then."""
    from types import SimpleNamespace

    from starlette.exceptions import HTTPException

    from engine import _serve_app

    monkeypatch.setattr(_serve_app, "BODY_READ_STOPPING_S", 0.2)
    monkeypatch.setattr(_serve_app, "BODY_READ_S", 3600.0)  # (past `run`'s own bound: only the stop's can end it)
    app = SimpleNamespace(state=SimpleNamespace(stopping=asyncio.Event(), body_waits=set()))
    pieces = 0

    async def trickle() -> dict[str, object]:
        nonlocal pieces
        pieces += 1
        if pieces == 1:
            return {"type": "http.request", "body": b"{", "more_body": True}
        await asyncio.Event().wait()  # the rest never comes
        raise AssertionError("unreachable")

    async def reads_the_body(scope: object, receive: Any, send: Any) -> None:
        await receive()
        _serve_app.stop_serving(app)  # type: ignore[arg-type]  # SIGTERM between two pieces
        await receive()

    async def run() -> None:
        guard = _serve_app.Guard(reads_the_body, token=None, body_bytes_max=100)  # type: ignore[arg-type]
        scope = {**_scope("POST", "/transfers", [(b"transfer-encoding", b"chunked")]), "app": app}
        with pytest.raises(HTTPException) as raised:  # (a `TimeoutError` out of `wait_for` if the stop's bound did not end it)
            await asyncio.wait_for(guard(scope, trickle, lambda message: asyncio.sleep(0)), 10)
        assert raised.value.status_code == 503

    asyncio.run(run())


def test_a_body_sent_as_text_is_told_the_content_type(client: httpx.Client) -> None:
    answer = client.post("/transfers", content='{"source": "s", "destination": "d", "amount": 1}',
                         headers={"Idempotency-Key": fresh("text"), "Content-Type": "text/plain"})
    assert answer.status_code == 400, answer.text
    assert "Content-Type: application/json" in answer.json()["error"]["message"]


@pytest.mark.parametrize("route", ["post", "void"])
def test_a_post_to_a_transfer_whose_id_ends_in_a_routes_name_moves_nothing(client: httpx.Client, route: str) -> None:
    """`POST /transfers/p%2Fpost` is a POST to the transfer "p/post", which takes none: not
    the post of the pending transfer "p" (the routes match the decoded path)."""
    bank, alice = funded(client, 100)
    pending = fresh("p")
    assert write(client, "/transfers", pending, {"source": alice, "destination": bank, "amount": 40,
                                                 "pending": True}).status_code == 201
    key = fresh("k")
    answer = write(client, f"/transfers/{pending}%2F{route}", key)
    assert answer.status_code == 405, answer.text
    assert error_of(answer)["code"] == "method_not_allowed" and answer.headers["allow"] == "GET"
    assert f"/transfers/{pending}%2F{route}" in str(error_of(answer)["message"])  # the path as sent
    assert client.get(f"/transfers/{pending}").json()["status"] == "pending"
    assert client.get(f"/transfers/{key}").status_code == 404
    assert client.get(f"/accounts/{alice}/balance").json()["pending"] == 40


@pytest.mark.parametrize("route", ["post", "void"])
@pytest.mark.parametrize("body", [b"null", b" null ", b"[]", b"5"])
def test_a_post_or_void_whose_body_is_json_but_no_object_is_400_not_an_empty_body(
        client: httpx.Client, route: str, body: bytes) -> None:
    """Only no body at all is a post of the whole amount (or a void); `null` is not one."""
    bank, alice = funded(client, 100)
    pending = fresh("p")
    assert write(client, "/transfers", pending, {"source": alice, "destination": bank, "amount": 40,
                                                 "pending": True}).status_code == 201
    key = fresh("k")
    answer = client.post(f"/transfers/{pending}/{route}", content=body,
                         headers={"Idempotency-Key": key, "Content-Type": "application/json"})
    assert answer.status_code == 400, answer.text
    assert error_of(answer)["code"] == "invalid_request"
    assert "must be a JSON object" in str(error_of(answer)["message"])
    assert client.get(f"/transfers/{pending}").json()["status"] == "pending"
    assert client.get(f"/transfers/{key}").status_code == 404
    assert client.get(f"/accounts/{alice}/balance").json()["pending"] == 40


@pytest.mark.parametrize("query", ["acount=x", "account=a&account=b", "limit=5&limit=6", "after=1"])
def test_an_unknown_or_repeated_query_parameter_is_400(client: httpx.Client, query: str) -> None:
    """A misspelt filter would be ignored, and the answer read as filtered when it is not."""
    bank, alice = funded(client, 10)
    answer = client.get(f"/transfers?{query}")
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["code"] == "invalid_request"
    assert client.get(f"/accounts/{alice}/entries?after=0&limit=5").status_code == 200  # the routes' own: fine
    assert client.get(f"/accounts/{alice}/balance?limit=5").status_code == 400
    assert client.get("/health?ts=1").status_code == 200  # a probe's cache-buster is its own business
    odd = f"{alice}/balance"  # read as itself: the account route, which takes no query parameter
    assert write(client, "/accounts", odd, {"currency": "USD"}).status_code == 201
    assert client.get(f"/accounts/{quote(odd, safe='')}").status_code == 200
    assert client.get(f"/accounts/{quote(odd, safe='')}?at_lsn=1").status_code == 400


NUMBERS = [("/accounts/{account_id}/balance", "at_lsn"), ("/accounts/{account_id}/balance", "at_timestamp"),
           ("/accounts/{account_id}/entries", "after"), ("/accounts/{account_id}/entries", "limit"),
           ("/transfers", "code"), ("/transfers", "after_lsn"), ("/transfers", "until_lsn"), ("/transfers", "limit"),
           ("/events", "after_lsn")]
"""Every number a query takes (`test_every_number_a_query_takes_is_checked_for_digits_alone`)."""


@pytest.mark.parametrize(("path", "name"), NUMBERS)
@pytest.mark.parametrize("written", ["1_0", "3.0", "+3", " 3", "3 ", "\N{ARABIC-INDIC DIGIT THREE}", "0x3", "-3", ""])
def test_a_number_in_a_query_is_digits_alone_not_read_as_another_number(
        client: httpx.Client, path: str, name: str, written: str) -> None:
    """pydantic would read `1_0` as 10, and `3.0`, `+3` or ` 3` as 3."""
    bank, alice = funded(client, 10)
    where = path.format(account_id=alice) + ("?follow=false&" if path == "/events" else "?")
    assert client.get(f"{where}{name}=3").status_code in (200, 404)  # read (an account opened after LSN 3: 404)
    answer = client.get(f"{where}{name}={quote(written, safe='')}")
    assert answer.status_code == 400, answer.text
    assert error_of(answer)["code"] == "invalid_request"
    assert f"query.{name}: Input should be a whole number" in str(error_of(answer)["message"])


@pytest.mark.parametrize("written", ["1_3", "+3", "3.0", "\N{ARABIC-INDIC DIGIT THREE}", "9" * 5_000])
def test_a_last_event_id_is_digits_alone(client: httpx.Client, written: str) -> None:
    funded(client, 1)
    assert client.get("/events", params={"follow": "false"}, headers={"Last-Event-ID": "3"}).status_code == 200
    answer = client.get("/events", params={"follow": "false"}, headers={"Last-Event-ID": written.encode()})
    assert answer.status_code == 400, answer.text
    assert error_of(answer)["code"] == "invalid_request"
    assert "Last-Event-ID" in str(error_of(answer)["message"])


def test_every_number_a_query_takes_is_checked_for_digits_alone(client: httpx.Client) -> None:
    schema = client.get("/openapi.json").json()
    numbers = {(path, parameter["name"]) for path, operations in schema["paths"].items()
               for operation in operations.values() for parameter in operation.get("parameters", [])
               if parameter["in"] == "query" and "integer" in json.dumps(parameter["schema"])}
    assert numbers == set(NUMBERS)


def test_a_query_that_is_not_utf8_once_decoded_is_refused_not_read_as_another_id(client: httpx.Client) -> None:
    made = client.post("/accounts", headers=[("Idempotency-Key", "�".encode())], json={"currency": "USD"})
    assert made.status_code == 201, made.text  # the id the query would be read as
    answer = client.get("/transfers?account=%FF")
    assert answer.status_code == 400, answer.text
    assert "not UTF-8" in answer.json()["error"]["message"]


@pytest.mark.parametrize(("method", "path"), [("GET", "/accounts/%FF"), ("GET", "/accounts/%C0%80/balance"),
                                              ("GET", "/transfers/%FF"), ("POST", "/transfers/%FF/post")])
def test_a_path_that_is_not_utf8_once_decoded_is_refused_not_read_as_another_id(
        client: httpx.Client, method: str, path: str) -> None:
    """The server decodes a path with replacement characters: /accounts/%FF would be the account "\ufffd"."""
    made = client.post("/accounts", headers=[("Idempotency-Key", "\ufffd".encode())], json={"currency": "USD"})
    assert made.status_code == 201, made.text  # the id the path would be read as (a retry replays it: 201)
    answer = client.request(method, path, headers={"Idempotency-Key": fresh("k")})
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["code"] == "invalid_request"
    assert "not UTF-8" in answer.json()["error"]["message"]
