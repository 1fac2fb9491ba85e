"""The console scripts (`edge-runtime`, `edge-proxy`, `edgectl`): each runs its command, or, when
the install lacks a library of the command's role, says which install it needs instead of a
traceback. The base install is the SDK only; pyproject.toml's extras add the roles. Standard
library only: it must run in any install."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable

_OWN = frozenset({"edge_runtime", "edge_wire", "proxy", "edgectl", "edge_client"})


def _run(target: str, extra: str, program: str) -> int:
    module, _, name = target.partition(":")
    try:
        main: Callable[[], int] = getattr(importlib.import_module(module), name)
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.split(".")[0] in _OWN:
            raise  # a broken install of our own code: the traceback says more
        print(f"{program}: error: this install lacks {exc.name}, which {program} needs: "
              f"pip install 'edge-runtime[{extra}]' (or [all] for the whole local stack)", file=sys.stderr)
        return 2
    return main()


def edge_runtime() -> int:
    return _run("edge_runtime.cli:main", "engine", "edge-runtime")


def edge_proxy() -> int:
    return _run("proxy.main:main", "sidecar", "edge-proxy")


def edgectl() -> int:
    return _run("edgectl.cli:main", "controller", "edgectl")
