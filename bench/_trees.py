"""Running another checkout's engine in a bench process (`--tree`), and checking it ran only that."""

from __future__ import annotations

import os
import sys


def from_tree(tree: str) -> None:
    """Every module of the engine this process loaded is `tree`'s (an editable install of
    another checkout supplies the modules a tree lacks: a run mixing two would measure neither)."""
    for name, module in list(sys.modules.items()):
        if name.split(".")[0] in ("coordinator", "engine", "journal"):
            where = os.path.abspath(getattr(module, "__file__", None) or tree)
            assert where.startswith(tree + os.sep), f"{name} came from {where}, not {tree}"
