"""The engine's kv_dtype: resolve_model builds the KV type it is given (or the recipe's) into a
cache directory of its own, refuses a built directory of another type, and `serve` with
kv_dtype = "fp16" answers from an fp16-cache model."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from edge_runtime.backends.onnxruntime import OnnxRuntimeBackend
from edge_runtime.client import EngineClient
from edge_runtime.errors import CheckpointError
from edge_runtime.manifest import read_manifest
from edge_runtime.models import cache_dir, find_recipe, resolve_model
from edge_wire.settings import ConfigError


@pytest.fixture
def recipes(tmp_path, monkeypatch, tiny_checkpoints) -> Path:
    """A recipe folder searched first, with the tiny llama checkpoint as "tiny-kv" (kv_dtype fp16)."""
    source = tiny_checkpoints["llama"][0]
    (tmp_path / "tiny-kv.toml").write_text(f'name = "tiny-kv"\nsource = "{source}"\nkv_dtype = "fp16"\n')
    monkeypatch.setenv("EDGE_RUNTIME_MODELS", str(tmp_path))
    return tmp_path


def _kv_bytes_per_token(model_dir: Path) -> int:
    return OnnxRuntimeBackend(model_dir, max_batch=1).kv_bytes_per_token()


def test_the_recipe_kv_dtype_builds_fp16_and_the_engine_setting_overrides_it(recipes):
    fp16 = resolve_model("tiny-kv", quiet=True)
    assert fp16 == cache_dir() / "models" / "tiny-kv-int8-kvfp16"
    assert read_manifest(fp16)["kv_dtype"] == "fp16"

    fp32 = resolve_model("tiny-kv", kv_dtype="fp32", quiet=True)
    assert fp32 == cache_dir() / "models" / "tiny-kv-int8"
    assert read_manifest(fp32)["kv_dtype"] == "fp32"
    assert _kv_bytes_per_token(fp16) * 2 == _kv_bytes_per_token(fp32)

    # Both builds stay: switching back reuses the fp16 one as it is.
    model_file = fp16 / read_manifest(fp16)["model_file"]
    built_at = model_file.stat().st_mtime_ns
    assert resolve_model("tiny-kv", kv_dtype="fp16", quiet=True) == fp16
    assert model_file.stat().st_mtime_ns == built_at


def test_a_checkpoint_takes_the_engine_kv_dtype(tiny_checkpoints):
    source = tiny_checkpoints["llama"][0]
    model_dir = resolve_model(str(source), kv_dtype="fp16", quiet=True)
    assert model_dir == cache_dir() / "models" / f"{source.name}-int8-kvfp16"
    assert read_manifest(model_dir)["kv_dtype"] == "fp16"


def test_a_built_directory_of_another_kv_type_is_refused(recipes):
    fp16 = resolve_model("tiny-kv", quiet=True)
    assert resolve_model(str(fp16), quiet=True) == fp16  # unset: taken as it is
    assert resolve_model(str(fp16), kv_dtype="fp16", quiet=True) == fp16
    with pytest.raises(ConfigError) as info:
        resolve_model(str(fp16), kv_dtype="fp32", quiet=True)
    assert str(info.value) == (f"kv_dtype: fp32 is set, but the built model {fp16} has a fp16 KV cache "
                               f'(set kv_dtype = "fp16", or rebuild it with `edge-runtime build --kv-dtype fp32`)')


def test_a_recipe_with_an_unknown_kv_dtype_is_refused(recipes):
    (recipes / "bad-kv.toml").write_text('name = "bad-kv"\nsource = "x"\nkv_dtype = "int8"\n')
    with pytest.raises(CheckpointError, match=r"bad-kv.toml: invalid model recipe \(kv_dtype 'int8': one of fp16, fp32\)"):
        find_recipe("bad-kv")


def test_serve_with_kv_dtype_fp16_answers_from_an_fp16_cache(tiny_checkpoints, tmp_path):
    source = tiny_checkpoints["llama"][0]
    with tempfile.TemporaryDirectory(prefix="er-", dir="/tmp") as d:  # a Unix socket path must be short
        socket_path = Path(d) / "e.sock"
        config = tmp_path / "config.toml"
        config.write_text(f'[engine]\nmodel = "{source}"\nkv_dtype = "fp16"\nmax_batch = 1\nsocket_path = "{socket_path}"\n'
                          "warm_shapes = false\n")
        proc = subprocess.Popen([sys.executable, "-m", "edge_runtime.cli", "serve", "--config", str(config)],
                                stderr=subprocess.PIPE, text=True)
        try:
            async def main():
                for _ in range(600):  # the first start builds the model
                    if socket_path.exists():
                        break
                    assert proc.poll() is None, proc.communicate()[1]
                    await asyncio.sleep(0.1)
                async with await EngineClient.connect(socket_path) as client:
                    frames = [f async for f in client.generate(prompt="hello", params={"temperature": 0.0, "max_tokens": 4,
                                                                                       "ignore_eos": True})]
                    return await client.status(), frames

            status, frames = asyncio.run(asyncio.wait_for(main(), 120))
        finally:
            proc.terminate()
            stderr = proc.communicate(timeout=30)[1]
    assert status["model"]["kv_dtype"] == "fp16", stderr
    fp16 = cache_dir() / "models" / f"{source.name}-int8-kvfp16"
    assert status["kv"]["bytes_per_token"] == _kv_bytes_per_token(fp16)
    assert frames[-1]["type"] == "done" and frames[-1]["usage"]["completion_tokens"] == 4


def test_the_kv_type_changes_the_system_fingerprint_only_when_not_fp32():
    from proxy.http.completions import fingerprint_of

    build = {"source_sha256": "ab" * 32, "quantization": "int8", "arch": "llama"}
    assert fingerprint_of({**build, "kv_dtype": "fp32"}) == fingerprint_of(build)  # builds before the key
    assert fingerprint_of({**build, "kv_dtype": "fp16"}) != fingerprint_of(build)
