"""Whether this process was made by `fork()` from one on Ray. `import engine` imports this
module (it imports nothing of the engine) and so registers its hook at once: a child whose
parent was on Ray knows it even if the parent never asked for a sharded name, which is when
`engine._ray` is imported (`engine/__init__.py` imports its public names when asked for)."""

from __future__ import annotations

import os
import sys

forked_from_ray = False
"""True in a child made by `fork()` from a process on Ray, or from such a child: it inherits
Ray's state but not its connection, so a sharded ledger it opened would wait for ever
(`engine._ray.join` refuses instead)."""


def _after_fork() -> None:
    """In a child made by `fork()`: note whether the parent was on Ray (or half-way through
    importing it)."""
    global forked_from_ray
    ray = sys.modules.get("ray")
    try:
        initialized = getattr(ray, "is_initialized", None)
        on_ray = bool(initialized()) if initialized is not None else False
    except Exception:  # a Ray half-imported at the fork: it cannot be used here either
        on_ray = True
    if on_ray:
        forked_from_ray = True


os.register_at_fork(after_in_child=_after_fork)
