"""What the `tally` command does to its standard streams (`engine._cli`): a report's text escaped
(`Escaped`), either stream writing what its encoding cannot as an escape (`unfailing_output`),
the engine's log said in one line (`OneLineLog`), and `tally tail`'s output pointed away from a
pipe nobody reads once it is interrupted, then given back (`drop_unwritten_output`,
`give_back_output`)."""

from __future__ import annotations

import io
import logging
import os
import stat
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from engine._cli_render import printable


def drop_unwritten_output() -> list[int]:
    """Point this process's standard output, if it is a pipe or a socket, at the null device,
    once `tally tail` is interrupted: a write blocked on a reader that reads no more (a full
    pipe), retried when the signal's handler returns, then ends, rather than waiting forever.
    What was not yet written is dropped (the output stops short either way); a terminal or a
    file, whose writes end, keeps it. Standard output replaced in this process (a test
    capturing it) is left as it is. Returns a duplicate of the output's own file, for
    `give_back_output` (none: left as it was)."""
    stream = sys.__stdout__
    if stream is None or (sys.stdout._out if isinstance(sys.stdout, Escaped) else sys.stdout) is not stream:
        return []
    try:
        fd = stream.fileno()
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)):
            return []
        null = os.open(os.devnull, os.O_WRONLY)
        try:
            kept = os.dup(fd)
            try:
                os.dup2(null, fd)
            except OSError:
                os.close(kept)
                raise
        finally:
            os.close(null)
    except (OSError, ValueError):  # closed, or no file descriptor: nothing is blocked on it
        return []
    return [kept]


def give_back_output(kept: int) -> None:
    """Undo `drop_unwritten_output` once `tally tail` wrote its last: what is still buffered
    is flushed to the null device (not left for the exit's flush to wait on the pipe), then the
    output is its own file again (a program calling `main` in-process keeps its output)."""
    try:
        sys.__stdout__.flush()  # type: ignore[union-attr]  # (not None: `kept` was duplicated from it)
        os.dup2(kept, sys.__stdout__.fileno())  # type: ignore[union-attr]
    except (OSError, ValueError):  # closed meanwhile: nothing to give back
        pass
    finally:
        os.close(kept)


class OneLineLog(logging.Handler):
    """What the engine logs while a command runs (a journal write that failed, a seal not
    written), as the command's own errors are said: one line on stderr each, `tally COMMAND: `
    and the message, an exception's own message after it and never its traceback (Python's
    last-resort handler printed the traceback of every `logger.exception`, and its
    `lmdb.Error`, to a user who can do nothing with them). Warnings and worse, as that
    handler; what it says is escaped (`printable`)."""

    def __init__(self, command: str) -> None:
        super().__init__(logging.WARNING)
        self._command = command

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
            error = record.exc_info[1] if record.exc_info else None
            if error is not None:
                text += f" ({error})" if str(error) else f" ({type(error).__name__})"
            print(printable(f"tally {self._command}: {text}"), file=sys.stderr, flush=True)
        except Exception:  # noqa: BLE001 - logging's rule: a handler that fails says so and goes on
            self.handleError(record)


@contextmanager
def unfailing_output() -> Iterator[None]:
    """Standard output and error writing a character their encoding cannot (an id, a check's
    mark, on a terminal or a pipe that is not UTF-8: `PYTHONIOENCODING=ascii`, `LC_ALL` of
    Latin-1) as a backslash escape rather than failing: a report is printed after the work is
    done, and an `UnicodeEncodeError` there would turn a whole ledger's exit 0 into a
    traceback and 1. `surrogateescape` (Python's in the C locale, UTF-8 mode off) fails on any
    other character as `strict` does, and is replaced too: no id nor path the tools take holds
    a byte it smuggles. Each stream's own error handling comes back on return."""
    changed: list[tuple[io.TextIOWrapper, str]] = []
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper) and stream.errors in ("strict", "surrogateescape"):
            errors = stream.errors
            stream.reconfigure(errors="backslashreplace")
            changed.append((stream, errors))
    try:
        yield
    finally:
        for stream, errors in changed:
            try:
                stream.reconfigure(errors=errors)
            except (OSError, ValueError):  # closed, or its flush failed (a reader gone): nothing to restore
                pass


class Escaped:
    """The standard output of a text report: each control character in what is printed (an id
    may hold any) is written escaped (a newline as `\\n`), so that no id can forge a line or
    drive the terminal; only the newline `print` ends each line with goes as it is."""

    def __init__(self, out: Any) -> None:
        self._out = out

    def write(self, text: str) -> int:
        self._out.write(text if text == "\n" else printable(text))
        return len(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._out, name)
