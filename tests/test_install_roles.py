"""Each role runs with what its install brings (pyproject.toml: the base install is the SDK, each
extra adds a role). In a fresh interpreter, every module of a distribution that the role's
install would not bring (read from pyproject.toml and the installed distributions' own
requirements) is made unimportable, and the role's modules are imported and set to work."""

from __future__ import annotations

import importlib.metadata as metadata
import re
import subprocess
import sys
import tomllib
from functools import cache
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
PROJECT = "edge-runtime"

# What each role does, as code run in the fresh interpreter.
ROLES = {
    "sdk": ((), """
import contextlib, io
import edge_client, edge_client.aio, edge_client.mqtt_device
edge_client.EdgeClient(["http://127.0.0.1:9"])
import edge_wire.launch  # the console scripts say which install the others need
err = io.StringIO()
with contextlib.redirect_stderr(err):
    assert [edge_wire.launch.edge_runtime(), edge_wire.launch.edge_proxy(), edge_wire.launch.edgectl()] == [2, 2, 2]
for extra in ("engine", "sidecar", "controller"):
    assert f"pip install 'edge-runtime[{extra}]'" in err.getvalue(), err.getvalue()
"""),
    "sidecar": (("sidecar",), """
import os
os.environ["EDGE_OFFLOAD_SECRET"] = "x" * 40
import proxy.main, proxy.broker, proxy.features, proxy.fleet.agent, proxy.offload.worker, proxy.auth.jwt, proxy.auth.jwt_keys
from edge_runtime.tracing import TracingConfig
from proxy.http.app import build_app
for argv in ([], ["--mqtt", "mqtt://127.0.0.1:1883"], ["--role", "cloud", "--upstream", "http://127.0.0.1:8000/v1"]):
    config, mqtt = proxy.main.load(proxy.main._parser().parse_args(argv))
    build_app(config)
    proxy.features.summary(mqtt, TracingConfig())
"""),
    "controller": (("controller",), """
import os, tempfile
import edgectl.cli
os.chdir(tempfile.mkdtemp())
assert edgectl.cli.main(["keygen", "ops"]) == 0
import edgectl.console.server  # the fleet console is part of the controller's install
"""),
    "engine": (("engine",), """
import edge_runtime.cli, edge_runtime.server, edge_runtime.models, edge_runtime.backends.onnxruntime, edge_runtime.grammar
edge_runtime.cli._parser().parse_args(["serve"])
import contextlib, io
err = io.StringIO()
with contextlib.redirect_stderr(err):
    assert edge_runtime.cli.main(["up"]) == 2  # the sidecar's command: says which install it needs
assert "`up` needs" in err.getvalue() and "pip install 'edge-runtime[" in err.getvalue(), err.getvalue()
"""),
}

BLOCKER = """
import sys
class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (not in this role's install)", name=name)
sys.meta_path.insert(0, Blocker())
"""


def _name(text: str) -> str:
    return re.sub(r"[-_.]+", "-", text).lower()


@cache
def _extras() -> dict[str, list[str]]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]


def _requirements(extras: tuple[str, ...]) -> set[str]:
    """The distributions the install of edge-runtime with `extras` brings, all the way down."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    todo = [Requirement(r) for r in project["dependencies"]]
    todo += [Requirement(f"{PROJECT}[{extra}]") for extra in extras]
    found: set[str] = set()
    while todo:
        req = todo.pop()
        name = _name(req.name)
        if name == PROJECT:  # our own extras (all = engine, sidecar, ...)
            todo += [Requirement(r) for extra in req.extras for r in _extras()[extra]]
            continue
        if name in found:
            continue
        found.add(name)
        try:
            requires = metadata.requires(req.name) or []
        except metadata.PackageNotFoundError:
            continue  # an optional part not installed here: nothing of it can be imported anyway
        for text in requires:
            sub = Requirement(text)
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in ("", *req.extras)):
                todo.append(sub)
    return found


def blocked_modules(extras: tuple[str, ...]) -> set[str]:
    """Top-level modules of the full stack's distributions that the role's install lacks."""
    allowed, everything = _requirements(extras), _requirements(("all", "otlp"))
    owners = metadata.packages_distributions()
    return {module for module, dists in owners.items()
            if {_name(d) for d in dists} & everything and not {_name(d) for d in dists} & allowed}


def test_the_roles_install_less_than_the_whole_stack():
    """The point of the extras: no role but the engine installs an ML library."""
    ml = {"numpy", "onnx", "onnxruntime", "tokenizers", "llguidance", "gguf", "safetensors"}
    for role in ("sdk", "sidecar", "controller"):
        assert ml <= blocked_modules(ROLES[role][0]), role
    assert not ml & blocked_modules(("engine",))
    assert "opentelemetry" in blocked_modules(("engine", "sidecar"))  # tracing is an extra of its own


@pytest.mark.parametrize("role", ROLES)
def test_each_role_runs_with_only_its_install(role):
    extras, code = ROLES[role]
    program = f"BLOCKED = {sorted(blocked_modules(extras))!r}\n{BLOCKER}\n{code}"
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
