"""Shared fixtures: a ledger directory, an open ledger, and raw access to its LMDB files."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import lmdb
import pytest
from engine import Ledger
from journal import lsn_key


_PYCACHE_ENV = ("PYTHONPYCACHEPREFIX", "PYTHONDONTWRITEBYTECODE")
_pycache_before: dict[str, str | None] = {}


def pytest_configure(config: pytest.Config) -> None:
    """Let the processes the tests start (`tally`, `tally serve`, a crashed writer, Ray's
    workers) share one bytecode cache, kept apart from the source tree and removed at the end.

    Hundreds of tests start a Python process that imports the engine; on a host that sets
    PYTHONDONTWRITEBYTECODE (as these machines do) each would compile every module again,
    ~0.2 s of CPU a process. The tests' own process is not changed."""
    _pycache_before.update({name: os.environ.get(name) for name in _PYCACHE_ENV})
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    os.environ["PYTHONPYCACHEPREFIX"] = tempfile.mkdtemp(prefix="tally-tests-pycache-")
    _interruptible()


def _interruptible() -> None:
    """Give SIGINT Python's own handler if this run inherited it ignored: a shell without job
    control (a script, a CI step) starts its background commands so, and Python then raises no
    `KeyboardInterrupt`, here or in the processes the tests start (an ignored signal stays
    ignored across `exec`; a handled one is reset to its default). The tests of Ctrl-C would
    wait out their bounds and fail."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_unconfigure(config: pytest.Config) -> None:
    prefix = os.environ.get("PYTHONPYCACHEPREFIX")
    for name, value in _pycache_before.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    if prefix is not None and prefix != _pycache_before.get("PYTHONPYCACHEPREFIX"):
        shutil.rmtree(prefix, ignore_errors=True)


SWEEP_MIN_IN_TESTS = 2
"""A checkpoint's sweep in the tests: their ledgers are small, and with the default every
checkpoint would hold every account; with this one most hold only what changed, so every
test that checkpoints walks the chain back when it reopens (see `coordinator._records`). The
same for the open pending transfers a checkpoint holds (CHECKPOINT5; their sweep's bound on
the chain's length is a million checkpoints here, so it is the sweep that decides)."""


@pytest.fixture(autouse=True)
def _checkpoints_hold_what_changed(monkeypatch: pytest.MonkeyPatch) -> None:
    import coordinator._checkpoint_rows

    monkeypatch.setattr(coordinator._checkpoint_rows, "CHECKPOINT_SWEEP_MIN", SWEEP_MIN_IN_TESTS)
    monkeypatch.setattr(coordinator._checkpoint_rows, "CHECKPOINT_PENDING_SWEEP_MIN", SWEEP_MIN_IN_TESTS)
    monkeypatch.setattr(coordinator._checkpoint_rows, "CHECKPOINT_PENDING_CHAIN", 1_000_000)


@pytest.fixture
def ledger_path(tmp_path: Path) -> Path:
    """A ledger directory that does not exist yet (`Ledger.open` creates it)."""
    return tmp_path / "ledger"


@pytest.fixture
def ledger(ledger_path: Path) -> Iterator[Ledger]:
    """An open ledger at `ledger_path`, closed after the test (closing twice is fine)."""
    opened = Ledger.open(ledger_path)
    try:
        yield opened
    finally:
        opened.close()


@contextmanager
def _raw_lmdb(path: Path) -> Iterator[lmdb.Environment]:
    env = lmdb.open(str(path), subdir=True, max_dbs=8, lock=True, create=False)
    try:
        yield env
    finally:
        env.close()


@pytest.fixture
def raw_lmdb() -> Callable[[Path], AbstractContextManager[lmdb.Environment]]:
    """Open a *closed* journal's LMDB environment directly, to damage it on purpose."""
    return _raw_lmdb


@pytest.fixture
def flip_record_byte() -> Callable[[Path, int], None]:
    """Flip the last byte of the stored record at an LSN (a payload byte, under its checksum)."""

    def flip(path: Path, lsn: int) -> None:
        with _raw_lmdb(path) as env:
            records = env.open_db(b"records", create=False)
            with env.begin(write=True, db=records) as txn:
                value = bytearray(txn.get(lsn_key(lsn)))
                value[-1] ^= 0xFF
                assert txn.put(lsn_key(lsn), bytes(value))

    return flip
