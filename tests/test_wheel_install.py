"""The install the systemd guide makes: a wheel built from this tree (not an editable install),
put into a fresh venv, run from a folder outside the source tree, serves the default model:
its recipe ships in the wheel (edge_runtime/recipes/). The fresh venv reaches the test venv's
dependencies through a .pth line, so the ML stack is not installed a second time."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# What the wheel is built from: the project files, without tests, venvs or caches.
SOURCES = ("pyproject.toml", "setup.py", "README.md", "models", "edge_runtime", "edge_wire", "proxy", "edge_client", "edgectl")
PROMPT = "The capital of Japan is"


def _run(*args: str | Path, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=300, **kwargs)
    assert done.returncode == 0, f"{args}: {done.stderr}"
    return done


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv holding the wheel; its bin/ folder."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    src.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / name, src / name)
    # The test venv's setuptools builds it (no build environment to download).
    _run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", root / "dist", src, env=_env())
    (wheel,) = (root / "dist").glob("edge_runtime-*.whl")
    venv.create(root / "venv", with_pip=True)  # its own pip (ensurepip: offline), whatever the test venv's pip
    python = root / "venv" / "bin" / "python"
    _run(python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel, env=_env())
    # After the install, so that pip sees no edge-runtime but the wheel's.
    site = Path(_run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip())
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "test-venv-deps.pth").write_text("".join(f"{p}\n" for p in sorted(ours)))
    return root / "venv" / "bin"


def _env() -> dict[str, str]:
    """This environment without anything that points into the source tree."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "EDGE_RUNTIME_MODELS")}


def test_the_wheel_ships_the_recipes(installed: Path, tmp_path: Path):
    code = "import edge_runtime.models as m; print(m.__file__); print(m.shipped_recipes())"
    module, recipes = _run(installed / "python", "-c", code, cwd=tmp_path, env=_env()).stdout.split()
    venv_root = installed.parent
    assert Path(module).is_relative_to(venv_root) and Path(recipes).is_relative_to(venv_root)
    assert (Path(recipes) / "smollm2-135m-instruct.toml").is_file()


@pytest.mark.slow
def test_the_installed_runtime_generates_with_the_default_model(installed: Path, tmp_path: Path, smollm_gguf: Path):
    """With an empty cache, as on a new machine: the first use builds the model, with progress."""
    done = _run(installed / "edge-runtime", "generate", "--prompt", PROMPT, "--max-tokens", "8", "--temperature", "0",
                cwd=tmp_path, env={**_env(), "EDGE_RUNTIME_CACHE": str(tmp_path / "cache")})
    assert "Tokyo" in done.stdout
    assert "building layers: 100%" in done.stderr
