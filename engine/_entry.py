"""The `tally` command's entry point. It imports the engine only once it is running
(`import engine` alone imports none of it: `engine.__getattr__`), so an interrupt during the
engine's ~0.2 s of imports, or while the command's parser is built, ends the command as one
does later (`engine._cli`): a line on stderr and exit status 130, not a traceback. (An
interrupt in the interpreter's own start-up, its first ~30 ms, still prints one.)"""

from __future__ import annotations

import sys


def main() -> int:
    """Run the `tally` command (`engine._cli.main`) and return its exit status: 130 (and
    "tally: interrupted" on stderr) if an interrupt escapes it."""
    try:
        from engine._cli import main as run

        return run()
    except KeyboardInterrupt:  # (a command's own interrupts are answered inside it, `engine._cli`)
        print("tally: interrupted", file=sys.stderr)
        return 130
