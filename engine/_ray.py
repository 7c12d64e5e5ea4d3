"""Ray, as the sharded ledger uses it: starting or joining it, placing the shard actors, and
waiting for their replies. The only module that imports `ray` (an optional dependency: the
`cluster` extra), and only when a `ShardedLedger` opens.

Loopback only. `ray.init(_node_ip_address="127.0.0.1")` alone is not enough: Ray turns a
loopback node address into the machine's routable one (`resolve_ip_for_localhost`), and its
servers then listen on every interface. With `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` Ray takes
the node's address to be the loopback one (as it does on a laptop), and since its servers bind
the node's address, every listener (GCS, raylet, object manager, workers, runtime-env agent)
is on 127.0.0.1; the dashboard is not started. `join` sets that and
`RAY_USAGE_STATS_ENABLED=0` (nothing is reported anywhere) in this process's environment
before Ray starts, so Ray's child processes inherit them (and, if Ray was imported already, the
value Ray read from it), then checks that Ray's node address is 127.0.0.1. (Checked with `ss -ltnp` while it
runs: tests/test_sharded.py asserts it.) With an `address`, the cluster's own settings
rule: Tally joins it and changes nothing.

Actors: one per shard, threaded (`max_concurrency`), pinned to a node (hard node affinity:
Ray restarts it there, where its disk is), restarted without limit and with every call retried
(`max_restarts=-1`, `max_task_retries=-1`), which is why every shard method is idempotent.
They take no CPU from Ray's accounting (`num_cpus=0`): a shard's cost is its disk and its
share of the machine, and N shards must fit on a node with fewer cores.

Waiting: every wait is bounded by the ledger's `timeout_s` (a shard restarting recovers its
ledger within it, or the caller gets `LedgerTimeout` and retries with the same ids).

Which Ray: a ledger notes the one it opened on (`ray_session`), and each round of calls
(`sent`), wait for replies (`gather`) and stop of a shard (`stop_shard`) first looks that this
process is still on it. A host that shut Ray down took the shards' actors with it, and a Ray
it started or joined since has none of them (Ray refuses the old handles with a bare
`Exception`, or waits for nothing): the calls are `LedgerClosed`, and the close stops nothing
and shuts no Ray down (`leave`): that Ray is the host's.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

from coordinator import InvalidRequest, LedgerClosed, LedgerError, LedgerTimeout, LedgerUnavailable
from engine import _fork

Sent = TypeVar("Sent")

SHARD_CONCURRENCY = 64
"""Calls one shard actor runs at once (its Ray threads)."""
LOOPBACK_ENVIRONMENT = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


_STARTED = threading.Lock()
_users = 0
"""Sharded ledgers open on the Ray this module started (0: none, or Ray is someone else's):
the last of them to close shuts it down."""
_started_session: str | None = None
"""The `ray_session` of the Ray this module started, while `_users` counts ledgers on it: a
host that shut it down and started its own has another (`join`, `leave`)."""
_waits = threading.Condition(_STARTED)
"""Notified (under `_STARTED`) when a `gather` ends its wait for Ray's replies."""
_waiting = 0
"""`gather`s waiting for Ray's replies now: `leave` lets them end (bounded) before it shuts
Ray down, since `ray.get` with no Ray up would start a new one (see `sent`)."""


JOIN_WAIT_S = 600.0
"""The longest an open waits for another sharded ledger of this process to finish starting or
shutting down Ray (a cluster's address may take minutes to join)."""


@contextmanager
def _holding(wait_s: float) -> Iterator[None]:
    """`_STARTED`, waited for at most `wait_s`: Ray's start or shutdown by another sharded
    ledger of this process, or its round being submitted, holds it meanwhile. `LedgerTimeout`
    if it is not free by then (nothing was sent: retry with the same ids)."""
    if not _STARTED.acquire(timeout=max(wait_s, 0.0)):
        raise LedgerTimeout(f"another sharded ledger of this process held Ray's start, stop or submissions for "
                            f"more than {wait_s} s: nothing was sent; retry with the same ids")
    try:
        yield
    finally:
        _STARTED.release()


def join(address: str | None) -> tuple[bool, str]:
    """Make this process a Ray driver: with `address` None, the Ray it already joined, else a
    new local one on loopback; with an address, that cluster. Returns (started, session):
    started True if the ledger must `leave` when it closes, as this module started the Ray it
    is on (the last to leave shuts it down); session, that Ray's `ray_session`, which the
    ledger's calls are checked against. A Ray the host started, also after shutting down one
    this module started, is the host's (not left). Raises `InvalidRequest` if Ray is not
    installed (the `cluster` extra)."""
    try:
        import ray
    except ModuleNotFoundError:
        raise InvalidRequest("a ShardedLedger needs Ray: pip install 'tally-ledger[cluster]'") from None

    global _users, _started_session
    if _forked_mid_start or _fork.forked_from_ray:
        raise LedgerUnavailable("this process was made by fork() from one on Ray, whose connection it cannot use: "
                                "open the sharded ledger from a process started with spawn (multiprocessing's "
                                "'spawn' or 'forkserver'), or from one that never joined Ray")
    with _holding(JOIN_WAIT_S):
        if ray.is_initialized():
            _check_same_cluster(address, ray.get_runtime_context().gcs_address)
            session = ray_session()
            assert session is not None, "Ray is up"
            if _users == 0 or session != _started_session:  # the host's own Ray: it shuts it down
                _users, _started_session = 0, None  # (one this module started is gone: its ledgers leave nothing)
                return False, session
            _users += 1
            return True, session
        _start(address)
        try:
            session = ray_session()
        except BaseException:  # (Ray Client's server gone at once): not left running
            ray.shutdown()
            raise
        assert session is not None, "Ray is up"
        _users, _started_session = 1, session
        return True, session


_forked_mid_start = False
"""Set in a child made by `fork()` while its parent was starting or stopping Ray
(`_after_fork`); a child of a parent merely on Ray: `engine._fork.forked_from_ray`."""


def _after_fork() -> None:
    """In a child made by `fork()`: note whether the parent was starting or stopping Ray (its
    lock held; whether it was on Ray, `engine._fork` notes). The child inherits Ray's state
    but not its connection, so a ledger it opened would wait for ever."""
    global _forked_mid_start, _users, _started_session, _STARTED, _waits, _waiting
    _users, _started_session = 0, None
    busy = _STARTED.locked()
    _STARTED = threading.Lock()  # (a lock held at the fork stays held in the child)
    _waits, _waiting = threading.Condition(_STARTED), 0
    if busy:
        _forked_mid_start = True


os.register_at_fork(after_in_child=_after_fork)


def _check_same_cluster(address: str | None, joined: str) -> None:
    """`InvalidRequest` if `address` names a cluster other than the one this process is on
    (`joined`, its GCS's host:port): a process joins one Ray cluster, so the ledger would
    silently run on the other one's nodes and disks. Ray reports a cluster joined at a
    loopback address by the machine's own address, so a loopback host is compared by its
    port alone; a `ray://` address (Ray Client's port, not its GCS's) is not compared."""
    if address is None or address == "auto" or address.startswith("ray://"):
        return
    host, port = _endpoint(address)
    joined_host, joined_port = _endpoint(joined)
    if port != joined_port or not (host == joined_host or _loopback(host) and _this_machine(joined_host)):
        raise InvalidRequest(f"this process is on the Ray cluster at {joined}, not {address!r} (a process joins one "
                             "cluster): open with address=None to use it, or from another process")


def _endpoint(address: str) -> tuple[str, str]:
    """(host, port) of a `host:port` address (an IPv6 host with or without brackets), a
    name resolved on this machine (as written if it does not resolve)."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        try:
            host = socket.gethostbyname(host)
        except (OSError, UnicodeError, ValueError, TypeError):  # no such name, or none a name can be
            pass
    return host, port


def _this_machine(host: str) -> bool:
    """Whether `host` (an IP) is one of this machine's addresses: one a socket can bind to
    (nothing is sent)."""
    if _loopback(host):
        return True
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((host, 0))
        return True
    except (OSError, ValueError):
        return False


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_nodes(node_ids: Sequence[str]) -> None:
    """`InvalidRequest` naming the first of `node_ids` that is no live node of this cluster (a
    restarted node has a new id): a shard pinned to it could never be placed."""
    import ray

    try:
        alive = {node["NodeID"] for node in ray.nodes() if node.get("Alive")}
    except Exception as error:  # Ray's own failures (its GCS out of reach) have no common class
        raise LedgerUnavailable(f"cannot list the Ray cluster's nodes: {error!r}") from error
    for index, node_id in enumerate(node_ids):
        if node_id not in alive:
            raise InvalidRequest(f"shard {index}: {node_id!r} is no live node of this Ray cluster (a restarted node "
                                 "has a new id)")


def _start(address: str | None) -> None:
    import ray

    if address is None:
        os.environ.update(LOOPBACK_ENVIRONMENT)
        _loopback_in_this_process()
        ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1",
                 log_to_driver=False, configure_logging=False)
        if ray.util.get_node_ip_address() != "127.0.0.1":  # pair the check: what Ray made of it
            ray.shutdown()
            raise LedgerUnavailable("Ray chose a node address other than 127.0.0.1, so it would listen beyond "
                                    "loopback: not started")
    else:
        try:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
        except ConnectionError as error:  # after Ray's own retries (minutes, for an address no one answers)
            raise LedgerUnavailable(f"cannot join the Ray cluster at {address!r}: {error}") from error
        except ValueError as error:  # an address Ray cannot parse
            raise InvalidRequest(f"address {address!r} is not a Ray cluster's address: {error}") from error


def _loopback_in_this_process() -> None:
    """Ray reads `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER` once, when `ray._private.ray_constants` is
    first imported; if this process imported Ray before, set what it read (the one private name
    of Ray this module touches; `join` checks the result)."""
    import sys

    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:
        constants.ENABLE_RAY_CLUSTER = False  # type: ignore[attr-defined]


def leave(session: str, wait_s: float) -> None:
    """A ledger that `join` started Ray for (`session`, its `ray_session`) closes: shut Ray
    down if it was the last, once the `gather`s under way have ended (waiting at most `wait_s`,
    the ledger's `timeout_s`, which bounds each of them; its shards' actors are stopped
    already, so they end at once). Nothing if the host shut that Ray down meanwhile: a Ray up
    now is the host's."""
    import ray

    global _users, _started_session
    with _holding(JOIN_WAIT_S):  # (a start under way: this ledger's close waits for it)
        deadline = time.monotonic() + wait_s
        while session == _started_session and _users == 1 and _waiting and (
                left_s := deadline - time.monotonic()) > 0:
            _waits.wait(left_s)  # (lets go of `_STARTED`: a `join` meanwhile counts itself in, and Ray stays)
        if session != _started_session:  # gone, and its count with it (`join`)
            return
        _users -= 1
        if _users == 0:
            _started_session = None
            if ray_session() == session:  # (else the host shut it down, and may have started its own)
                ray.shutdown()


def ray_session() -> str | None:
    """Which Ray this process is on now, None if none: its cluster's session name (a new Ray
    has a new one) and this driver's job id (each connection to a cluster is a new job, and a
    driver's actors end with its job). A few microseconds (with Ray Client, two requests to
    its server). Raises `LedgerUnavailable` if Ray cannot say (Ray Client's server gone)."""
    import ray

    if not ray.is_initialized():
        return None
    try:
        context = ray.get_runtime_context()
        return f"{context.get_session_name()} job {context.get_job_id()}"
    except Exception as error:  # Ray's own failures (its client's server out of reach) have no common class
        if not ray.is_initialized():  # shut down by the host meanwhile
            return None
        raise LedgerUnavailable(f"cannot ask Ray which cluster this process is on: {error!r}") from error


def local_node() -> str:
    import ray

    return str(ray.get_runtime_context().get_node_id())


def start_shard(path: str, index: int, node_id: str, options: dict[str, Any]) -> Any:
    """A new shard actor for `path` pinned to node `node_id` (its handle)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from engine._shard import Shard

    try:
        strategy = NodeAffinitySchedulingStrategy(node_id, soft=False)
        remote = ray.remote(Shard).options(  # type: ignore[attr-defined]
            max_concurrency=SHARD_CONCURRENCY, max_restarts=-1, max_task_retries=-1, num_cpus=0,
            scheduling_strategy=strategy, name=None,
        )
    except ValueError as error:  # Ray's word for a node id that is not one
        raise InvalidRequest(f"shard {index}: {node_id!r} is not a Ray node id ({error})") from None
    try:
        return remote.remote(path, index, options)
    except TypeError as error:  # Ray's "Could not serialize the argument ...": an option holding a lock, say
        raise InvalidRequest(f"shard {index}: a ledger option cannot be sent to the shard's process "
                             f"({str(error).splitlines()[0]})") from None


def stop_shard(actor: Any, session: str, wait_s: float) -> None:
    """Kill a shard's actor for good, if this process is still on the Ray it was started on
    (`session`: else its process went with that Ray, a kill with no Ray up would start a new
    one, see `sent`, and another Ray refuses the handle); `LedgerTimeout` if `_STARTED` is not
    free within `wait_s` (`_holding`)."""
    import ray

    with _holding(wait_s):
        if ray_session() == session:
            ray.kill(actor, no_restart=True)


def sent(submit: Callable[[], Sent], closed: Callable[[], bool], session: str, wait_s: float) -> Sent:
    """`submit()`, which makes the `.remote()` calls of one round to a ledger's shards, unless
    the ledger is `closed()` or this process is no longer on the Ray its shards were started on
    (`session`: Ray is down, or the host started another): then `LedgerClosed`. A call under
    way in another thread when the last ledger on the Ray `join` started closed (`leave`) would
    otherwise reach Ray with none running, and Ray would start a new local one with its
    defaults (`ray.init()`: seconds, its processes left running) only to fail with a bare
    `Exception`; one on a Ray started since fails so on its actors' old handles. Under
    `_STARTED`, so no `leave` shuts Ray down between the look and the calls (they only queue
    the requests: no wait here); a ledger is marked closed before it leaves. `_STARTED` is
    waited for at most `wait_s` (`_holding`)."""
    with _holding(wait_s):
        if closed():
            raise LedgerClosed("the sharded ledger was closed while this call was under way")
        if ray_session() != session:
            raise LedgerClosed("the Ray this sharded ledger's shards ran on was shut down, and its shards with it (by "
                               "the host; a Ray started since has none of them): open the ledger again")
        return submit()


def gather(refs: Sequence[Any], timeout_s: float, session: str) -> list[Any]:
    """The replies to `refs`, in order, waiting at most `timeout_s` in all. A `LedgerError`
    raised inside an actor comes back as itself (Ray wraps it: unwrapped here). Raises
    `LedgerTimeout` (the outcomes are unknown: retry with the same ids), also while a shard
    is unavailable for a moment, `LedgerUnavailable` if a shard's actor is gone for good, and
    `LedgerClosed` if this process is no longer on the Ray `refs` were sent on (`session`:
    see `sent`), as after the ledger that started it closed."""
    import ray
    from ray.exceptions import (
        ActorUnavailableError,
        ActorUnschedulableError,
        GetTimeoutError,
        RayActorError,
        RayTaskError,
    )

    global _waiting
    with _holding(timeout_s):  # `ray.get` with no Ray up would start a new one, as `.remote()` would: see `sent`
        if ray_session() != session:
            raise LedgerClosed("the sharded ledger was closed, or the Ray its shards ran on was shut down, while this "
                               "call was under way")
        _waiting += 1  # (`leave` lets this wait end before it shuts Ray down)
    try:
        return list(ray.get(list(refs), timeout=timeout_s))
    except GetTimeoutError as error:
        raise LedgerTimeout(f"a shard did not answer within {timeout_s} s: retry with the same ids") from error
    except RayTaskError as error:
        cause = error.cause
        if isinstance(cause, LedgerError):
            raise cause from None
        raise
    except ActorUnschedulableError as error:  # its node is gone (a shard is pinned to one)
        raise LedgerUnavailable(f"a shard's actor cannot be placed: {error}") from error
    except ActorUnavailableError as error:  # restarting, or out of reach for now
        raise LedgerTimeout(f"a shard is unavailable for now ({error}): retry with the same ids") from error
    except RayActorError as error:
        raise LedgerUnavailable(f"a shard's actor is gone: {error}") from error
    finally:
        with _holding(JOIN_WAIT_S):  # (held briefly, or through another ledger's start of Ray)
            _waiting -= 1
            _waits.notify_all()


def unwrap(reply: tuple[bool, Any]) -> Any:
    """A `Shard.call` reply: its value, or its error raised."""
    ok, value = reply
    if not ok:
        raise value
    return value
