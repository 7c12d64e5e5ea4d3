"""`tally serve`: an HTTP JSON service on a ledger, the reference host (README.md, "Serving
over HTTP").

It uses the public `AsyncLedger` API alone. `make_app` builds the FastAPI application (a
host may run it under an ASGI server of its own); `serve` runs it under uvicorn on one event
loop in this process, which holds the ledger's directory lock while it runs.

FastAPI and uvicorn are the optional extra `serve`; this module imports them only when called,
so `import engine` never needs them, and without them it raises `ServeExtraMissing`.

Stopping: SIGTERM or SIGINT (Ctrl-C) stops accepting connections, ends the event streams,
lets the requests under way finish (a write returns once durable; bounded by
`GRACEFUL_SHUTDOWN_S`), then closes the ledger (which seals its data file), and the process
exits 0. A second Ctrl-C stops at once: the requests under way are cancelled (their clients
get no answer, or a 500: a retry with the same `Idempotency-Key` learns each outcome), the
ledger is still closed, one line on stderr says so (or that it was not closed, and why), and
the process exits 130, as an interrupted command does. SIGKILL loses nothing acknowledged: a
2xx answer is sent only once its outcome is durable.
"""

from __future__ import annotations

import asyncio
import fcntl
import gc
import ipaddress
import json
import logging
import signal
import socket
import struct
import sys
import termios
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from engine import InvalidRequest

if TYPE_CHECKING:
    from fastapi import FastAPI
    from starlette.types import Message, Receive, Scope, Send

BODY_BYTES_MAX = 1 << 20
"""The largest request body, 1 MiB (413 `body_too_large` above it): a linked chain of 1,000
legs with 128-character ids, a reference and a little metadata each fits."""
STALLED_S = 2.0
"""Once stopping, how long the bytes a connection holds for its client may stay unread (not
one taken) before the connection is closed: its client stopped reading."""
GRACEFUL_SHUTDOWN_S = 35
"""Longest wait, once stopping, for the requests under way (a write waits at most the ledger's
`timeout_s`, 30 s by default); then they are cancelled and the ledger closes."""
FORCED_STOP_S = 5.0
"""Longest wait, on a second Ctrl-C, for the requests under way to end once cancelled (each
ends at its next wait); then the ledger closes."""
INTERRUPTED_EXIT = 130
"""The exit status after a second Ctrl-C (the `tally` command's for an interrupted command)."""
BACKLOG = 2048
"""Connections the listening socket queues before they are accepted."""
HEAD_BYTES_MAX = 64 << 10
"""The largest request head (its request line and headers), 64 KiB: more is 431
`headers_too_large` and the connection is closed. uvicorn's httptools protocol has no bound of
its own: it would hold a header that never ends in memory as it arrives, before any route, the
token's check included, sees the request."""
HEAD_READ_S = 30.0
"""Longest wait for a request's line and headers: from the connection's start for its first
request, from the first byte that comes between two requests for the others. A head begun and
not whole by then is 408 `request_timeout` and the connection is closed; a connection that sent
nothing of a request is closed. uvicorn's httptools protocol bounds neither (its keep-alive
timer runs only from a response's end until the next byte), so a client that opens
connections and sends a few bytes would hold them, uncounted among the requests in flight
(the body's own bound is `engine._serve_app.BODY_READ_S`)."""
SERVE_EXTRA = "pip install 'tally-ledger[serve]'"

logger = logging.getLogger("tally.serve")


class ServeExtraMissing(ImportError):
    """FastAPI or uvicorn is not installed."""


def _require_extra() -> None:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as error:
        raise ServeExtraMissing(f"FastAPI and uvicorn are needed to serve ({error.name} is missing): {SERVE_EXTRA}"
                                ) from error


def make_app(ledger_path: str | Path, *, token: str | None = None, body_bytes_max: int = BODY_BYTES_MAX,
             **ledger_options: Any) -> FastAPI:
    """The FastAPI application serving the ledger at `ledger_path`: its lifespan opens it with
    `AsyncLedger.open(ledger_path, **ledger_options)` and closes it on shutdown. With `token`,
    every route but `/health` needs `Authorization: Bearer <token>`. Raises
    `ServeExtraMissing` without FastAPI, `InvalidRequest` for a bad token or limit; the
    ledger's own errors come when the server starts it."""
    _require_extra()
    from engine._serve_app import build_app

    if token is not None and not _token_ok(token):
        raise InvalidRequest("the token must be 1 to 4096 visible ASCII characters, without spaces")
    if type(body_bytes_max) is not int or not 1024 <= body_bytes_max <= 1 << 30:
        got = (f"a {type(body_bytes_max).__name__}" if type(body_bytes_max) is not int  # (no int of 4,300 digits
               else f"{body_bytes_max}" if body_bytes_max.bit_length() <= 256  # has a repr: as `shown` says it)
               else f"an int of {body_bytes_max.bit_length()} bits")
        raise InvalidRequest(f"body_bytes_max must be an int in 1024..{1 << 30}, got {got}")
    return build_app(str(ledger_path), token, body_bytes_max, ledger_options)


def _token_ok(token: str) -> bool:
    return 0 < len(token) <= 4096 and token.isascii() and token.isprintable() and " " not in token


def read_token(path: str) -> str:
    """The token in the file at `path` (surrounding whitespace ignored)."""
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeError) as error:
        raise InvalidRequest(f"--token-file {path}: cannot be read ({error})") from None
    if not _token_ok(token):
        raise InvalidRequest(f"--token-file {path}: the token must be 1 to 4096 visible ASCII characters, "
                             "without spaces")
    return token


def is_loopback(host: str) -> bool:
    """Whether every address `host` names is a loopback address."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        found = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return False
    return bool(found) and all(ipaddress.ip_address(str(info[4][0]).split("%")[0]).is_loopback for info in found)


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket on `host`:`port` (port 0: a free one), bound before the ledger opens
    so that an address in use is said at once and changes nothing."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        listening = socket.socket(family, kind, proto)
    except OSError as error:
        raise InvalidRequest(f"cannot listen on {host}:{port}: {error}") from None
    try:
        listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listening.bind(address)
        listening.listen(BACKLOG)
    except OSError as error:
        listening.close()
        raise InvalidRequest(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    return listening


def serve(path: str, *, host: str, port: int, token_file: str | None, insecure: bool, body_bytes_max: int,
          access_log: bool) -> int:
    """Run the service until SIGTERM or SIGINT; the exit status (0 after a clean stop).
    Prints one line on stdout once it serves: `tally serve: serving PATH on http://HOST:PORT`.
    Raises `InvalidRequest` for a non-loopback `host` without a token (unless `insecure`), an
    unreadable token or an address it cannot listen on, and the ledger's own errors."""
    _require_extra()
    import uvicorn
    from uvicorn.lifespan.on import LifespanOn

    from engine._serve_app import stop_serving, stopped_at_once

    token = read_token(token_file) if token_file is not None else None
    if token is None and not insecure and not is_loopback(host):
        raise InvalidRequest(f"--host {host} is not a loopback address: anyone who can reach it could move money. "
                             "Give --token-file F (a bearer token), or --insecure to serve it without one")
    app = make_app(path, token=token, body_bytes_max=body_bytes_max)
    listening = _bind(host, port)
    bound = listening.getsockname()
    shown = f"[{bound[0]}]" if listening.family == socket.AF_INET6 else bound[0]
    ready = f"tally serve: serving {path} on http://{shown}:{bound[1]} (docs at /docs; SIGTERM or Ctrl-C stops it)"

    class Server(uvicorn.Server):
        closing_stalled: asyncio.Task[None] | None = None
        cut_short = 0
        """Requests a second Ctrl-C cancelled."""

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            super().handle_exit(sig, frame)
            loop = getattr(app.state, "loop", None)
            if loop is not None and getattr(app.state, "stopping", None) is not None:
                loop.call_soon_threadsafe(stop_serving, app)  # the event streams end, so the drain can
                loop.call_soon_threadsafe(self.close_stalled)

        def close_stalled(self) -> None:
            """Once stopping, close each connection whose client stopped reading (an event
            stream's, say): uvicorn would wait until its graceful shutdown gave up for the
            bytes it holds to drain, or for a send it blocks to end."""
            if self.closing_stalled is None:
                self.closing_stalled = asyncio.ensure_future(_close_stalled(self.server_state.connections))

        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            await super().shutdown(sockets=sockets)
            if self.force_exit and isinstance(self.lifespan, LifespanOn) and not self.lifespan.shutdown_event.is_set():
                await self.stop_at_once()

        async def stop_at_once(self) -> None:
            """After a second Ctrl-C, which made uvicorn stop waiting for the requests under way
            and skip the application's shutdown (the loop's end would have cancelled them and the
            lifespan, a `CancelledError` traceback each, the ledger left to that cancellation):
            cancel the requests here, their tracebacks kept out of the log (their cancellation
            is the stop asked for), then shut the application down, which closes the ledger."""
            running = [task for task in self.server_state.tasks if not task.done()]
            self.cut_short = len(running)
            logging.getLogger("uvicorn.error").addFilter(_without_cancellations)
            for task in running:
                task.cancel()
            if running:
                await asyncio.wait(running, timeout=FORCED_STOP_S)
            await self.lifespan.shutdown()

    def on_ready() -> None:
        gc.freeze()  # the ledger's accounts, just loaded, stay out of every full collection (README, AsyncLedger)
        print(ready, flush=True)

    config = uvicorn.Config(_announcing(app, on_ready), lifespan="on", http=_bounded_head_protocol(),
                            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S, access_log=access_log,
                            log_level="info", backlog=BACKLOG)
    server = Server(config)

    def stopped(_sig: int, _frame: FrameType | None) -> None:
        server.should_exit = True  # before uvicorn takes the signals: it stops as soon as it starts

    # uvicorn handles SIGINT and SIGTERM while it runs, and raises the signal that stopped it
    # again once it has shut down; these handlers take that one, so a stop asked for is a
    # clean exit (0), not a death by the signal.
    previous = {sig: signal.signal(sig, stopped) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run(sockets=[listening])
    except SystemExit:  # uvicorn's own exit when the startup failed (some releases exit, others return)
        if app.state.startup_error is None:
            raise
    finally:
        listening.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        logging.getLogger("uvicorn.error").removeFilter(_without_cancellations)
    if app.state.startup_error is None and server.force_exit:
        print(stopped_at_once(app, server.cut_short), file=sys.stderr, flush=True)
        return INTERRUPTED_EXIT
    failure = app.state.startup_error or app.state.shutdown_error
    if failure is not None:
        raise failure
    return 0


def _without_cancellations(record: logging.LogRecord) -> bool:
    """A log filter: no record of a request's `CancelledError` (a second Ctrl-C cancelled it)."""
    return not (record.exc_info and isinstance(record.exc_info[1], asyncio.CancelledError))


async def _close_stalled(connections: set[Any]) -> None:
    """Until cancelled (as the server's loop ends): abort each connection that holds bytes
    its client has not taken (in the transport, once the socket's send buffer is full) and
    whose unsent bytes, the socket's included, have not moved for `STALLED_S`. Only such a
    connection would hold the shutdown: one whose transport holds nothing closes at once."""
    loop = asyncio.get_running_loop()
    held: dict[Any, tuple[int, float]] = {}
    while True:
        now = loop.time()
        for connection in list(connections):
            transport = getattr(connection, "transport", None)
            if transport is None:
                continue
            waiting = transport.get_write_buffer_size()
            unsent = waiting + _socket_queue(transport)  # a client reading drains the socket's queue
            before = held.get(connection)
            if not waiting or before is None or before[0] != unsent:
                held[connection] = (unsent, now)
            elif now - before[1] >= STALLED_S:
                logger.warning("closing the connection to %s as the server stops: its client stopped reading",
                               _shown_client(getattr(connection, "client", None)))
                transport.abort()
                del held[connection]
        for gone in held.keys() - connections:
            del held[gone]
        await asyncio.sleep(STALLED_S / 4)


def _socket_queue(transport: Any) -> int:
    """The bytes a transport's socket holds, not yet taken by its peer (0 where the system
    does not say)."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return 0
    try:
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
    except (OSError, ValueError):
        return 0


def _shown_client(client: Any) -> str:
    return f"{client[0]}:{client[1]}" if isinstance(client, tuple) and len(client) == 2 else "a client"


def _bounded_head_protocol() -> Any:
    """uvicorn's httptools protocol, answering 431 and closing the connection once a request's
    head has taken more than `HEAD_BYTES_MAX` bytes (counted by the chunks read while it is
    incomplete: at most one chunk more, or two when the head began in a chunk that also held
    an earlier request of the connection, a pipelined one: that chunk's share of it is unknown,
    and the earlier request's bytes are never counted as this head's), and once it has taken
    longer than `HEAD_READ_S` (408, see there). Without httptools, uvicorn's h11 protocol,
    which bounds a head's size itself (16 KiB, `h11_max_incomplete_event_size`; a plain-text
    400 beyond it), not its time. It overrides seven of the protocol's methods, each calling the
    original."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        return "h11"
    from engine._serve_errors import error_body, status_of

    problem = json.dumps(error_body("headers_too_large", f"the request's line and headers are larger than this "
                                                         f"server's limit of {HEAD_BYTES_MAX:,} bytes")).encode()
    refusal = (f"HTTP/1.1 {status_of('headers_too_large')} Request Header Fields Too Large\r\n"
               f"content-type: application/json\r\ncontent-length: {len(problem)}\r\nconnection: close\r\n\r\n"
               ).encode() + problem
    late = json.dumps(error_body("request_timeout", "the request's line and headers did not arrive within "
                                                    f"{HEAD_READ_S:g} s: nothing was done")).encode()
    too_late = (f"HTTP/1.1 {status_of('request_timeout')} Request Timeout\r\n"
                f"content-type: application/json\r\ncontent-length: {len(late)}\r\nconnection: close\r\n\r\n"
                ).encode() + late

    class BoundedHead(HttpToolsProtocol):
        in_head = False
        """A request's head has begun and is not whole yet."""
        between = True
        """No request is being read: the next byte begins one (or is a stray line break)."""
        heads_begun = 0
        """The heads begun on this connection: tells whether one began inside a chunk."""
        head_bytes = 0
        """The bytes read since it began."""
        head_timer: asyncio.TimerHandle | None = None
        """Armed while the connection waits for a request's head (`HEAD_READ_S`)."""

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._time_head()

        def connection_lost(self, exc: Exception | None) -> None:
            self._untime_head()
            super().connection_lost(exc)

        def _time_head(self) -> None:
            if self.head_timer is None:
                self.head_timer = self.loop.call_later(HEAD_READ_S, self._head_late)

        def _untime_head(self) -> None:
            if self.head_timer is not None:
                self.head_timer.cancel()
                self.head_timer = None

        def _responding(self) -> bool:
            return self.cycle is not None and not self.cycle.response_complete

        def _head_late(self) -> None:
            """`HEAD_READ_S` passed and no head became whole: answer 408 and close, or close
            if no byte of a request came (or a request answered before its body had all come
            did not finish sending it); but never across a response under way (a pipelined
            head's time then starts again once the response ends)."""
            self.head_timer = None
            if self.transport.is_closing():
                return
            if self._responding():
                self._time_head()
                return
            if self.in_head:
                self.in_head = False
                self.transport.write(too_late)
            self.transport.close()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self.transport.is_closing():
                return
            if self.in_head or not self.between:
                # A head begun during the response has its full time from now on; a request
                # answered before its body all came (a 401, a 413 by its Content-Length) has
                # that long to send the rest, which uvicorn reads and drops: its keep-alive
                # timer, stopped by each byte, would otherwise let a trickle hold the connection.
                self._untime_head()
                self._time_head()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self.in_head, self.between, self.head_bytes = True, False, 0
            self.heads_begun += 1
            self._time_head()

        def on_headers_complete(self) -> None:
            self.in_head = False
            self._untime_head()
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            self.between = True
            self._untime_head()  # (a body's rest, come after its response: `on_response_complete`)
            if self.cycle is not None and self.cycle.response_complete and not self.transport.is_closing():
                # So answered, the connection is idle now: uvicorn's keep-alive wait, which the
                # body's bytes stopped, begins again (as at a response's end).
                self._unset_keepalive_if_required()
                self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive,
                                                                    self.timeout_keep_alive_handler)
            super().on_message_complete()

        def data_received(self, data: bytes) -> None:
            # Whether every byte of `data` is the head read at its end: the chunk began in it,
            # or between two requests and began only it. Else an earlier request (its head's
            # end, its body) came first in the chunk: the head's share is then not counted.
            began_in, began_between, begun = self.in_head, self.between, self.heads_begun
            if began_between and not self._responding():  # (a byte between two requests ends uvicorn's keep-alive
                self._time_head()  # wait: this bounds what follows; one during a response, that response's end)
            super().data_received(data)
            if not self.in_head:
                return
            if self.heads_begun == begun + (0 if began_in else 1) and (began_in or began_between):
                self.head_bytes += len(data)
            if self.head_bytes > HEAD_BYTES_MAX and not self.transport.is_closing():
                self.in_head = False
                self.transport.write(refusal)
                self.transport.close()

    return BoundedHead


def _announcing(app: FastAPI, on_ready: Callable[[], None]) -> Callable[[Scope, Receive, Send], Any]:
    """`app`, calling `on_ready` once its lifespan has started (the ledger is open and the
    socket listening), and turning a `LedgerError` at startup or shutdown into a line the
    command prints (not a traceback in uvicorn's log)."""

    async def announced(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await app(scope, receive, send)
            return

        async def watched(message: Message) -> None:
            kind = message["type"]
            if kind == "lifespan.startup.complete":
                on_ready()
            elif kind == "lifespan.startup.failed" and app.state.startup_error is not None:
                message = {"type": kind, "message": ""}
            elif kind == "lifespan.shutdown.failed" and app.state.shutdown_error is not None:
                message = {"type": kind, "message": ""}
            await send(message)

        await app(scope, receive, watched)

    return announced


def run_command(args: Any) -> int:
    """`tally serve` from its parsed arguments (`engine._cli_parse`, `_serve_parser`; run by `engine._cli`)."""
    try:
        return serve(args.path, host=args.host, port=args.port, token_file=args.token_file, insecure=args.insecure,
                     body_bytes_max=args.body_bytes_max, access_log=not args.no_access_log)
    except ServeExtraMissing as error:
        print(f"tally serve: {error}", file=sys.stderr)
        return 2
