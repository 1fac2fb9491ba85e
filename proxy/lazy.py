"""Package names that import their module on first use (PEP 562), so that importing one part of
a package (its config tables, say) does not load all the others: a sidecar without a broker
reads the MQTT side's settings but never loads paho, the fleet agent or the signing code, which
keeps its memory and start-up small."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def exports(package: str, names: Mapping[str, str]) -> Callable[[str], Any]:
    """A `__getattr__` for `package`: each name in `names` comes from its (relative) module."""

    def __getattr__(name: str) -> Any:
        module = names.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(module, package), name)

    return __getattr__
