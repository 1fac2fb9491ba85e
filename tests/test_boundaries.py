"""Package boundaries, checked in fresh interpreters: the sidecar and the cloud worker load no ML
library, the engine loads nothing of the sidecar, and the wire package depends on neither."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ML_LIBRARIES = ("onnx", "onnxruntime", "tokenizers", "gguf", "llguidance", "jinja2", "numpy", "safetensors", "torch",
                "transformers")


def loaded_after(code: str) -> set[str]:
    """The top-level packages in sys.modules after `code` runs in a new interpreter."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}})))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    return set(json.loads(result.stdout.splitlines()[-1]))


@pytest.mark.parametrize("entry", [
    "import proxy.main",  # edge-proxy: the gateway sidecar, and the cloud worker (--role cloud)
    "import proxy.main, proxy.broker, proxy.offload.worker; proxy.main._parser().parse_args(['--role', 'cloud'])",
    "import proxy.up",  # edge-runtime up's own side
    "import edgectl.cli",  # the controller
])
def test_the_sidecar_worker_and_controller_load_no_ml_library(entry):
    assert loaded_after(entry) & set(ML_LIBRARIES) == set()


def test_the_engine_loads_nothing_of_the_sidecar():
    loaded = loaded_after("import edge_runtime.cli, edge_runtime.server, edge_runtime.client")
    assert {"proxy", "edgectl", "edge_client"} & loaded == set()


def test_the_wire_package_depends_on_neither_process():
    loaded = loaded_after("import edge_wire.frames, edge_wire.messages, edge_wire.sampling, edge_wire.validation")
    assert {"proxy", "edge_runtime", "edgectl"} & loaded == set()
    assert loaded & set(ML_LIBRARIES) == set()


@pytest.mark.parametrize("package, forbidden", [
    ("edge_runtime", {"proxy", "edgectl", "edge_client"}),
    ("edge_wire", {"proxy", "edgectl", "edge_client", "edge_runtime"}),
    ("edge_client", {"proxy", "edgectl", "edge_runtime", "edge_wire"}),
])
def test_no_module_names_a_forbidden_package(package, forbidden):
    """Also the imports a run above would not reach (inside functions, behind flags)."""
    offenders = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] in forbidden]
    assert offenders == []


def test_a_sidecar_without_a_broker_loads_no_mqtt_side():
    """Memory and start-up: paho, the fleet agent's signing code and psutil load only when used."""
    loaded = loaded_after("import proxy.main\nproxy.main.load(proxy.main._parser().parse_args([]))\n"
                          "from proxy.http.app import build_app\nbuild_app(proxy.main.load(proxy.main._parser().parse_args([]))[0])")
    assert {"paho", "cryptography", "psutil", "sqlite3"} & loaded == set()
