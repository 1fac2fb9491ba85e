"""The engine daemon's config: the [engine] table, its validation, overrides, socket path."""

import asyncio
import os
import shutil
import stat
from pathlib import Path

import pytest

from edge_runtime.cli import _SERVE_OVERRIDES, _parser
from edge_runtime.client import EngineClient
from edge_runtime.config import EngineConfig, default_socket_path, load_config
from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.server import prepare_socket_path
from edge_wire import settings as config_module
from edge_wire.settings import ConfigError


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_reads_engine_table_and_ignores_other_tables(tmp_path):
    path = _write(tmp_path, """
[engine]
model = "glm-edge"
max_batch = 8
prefix_cache_mb = 64
warmup_prompts = ["Be brief.", { system = "You are a thermostat." }]
grace_s = 5

[proxy]
port = 8080
""")
    cfg = load_config(path)
    assert (cfg.model, cfg.max_batch, cfg.prefix_cache_mb, cfg.grace_s) == ("glm-edge", 8, 64, 5)
    assert cfg.warmup_prompts == ("Be brief.", {"system": "You are a thermostat."})
    assert cfg.queue_size == EngineConfig().queue_size


def test_defaults_without_a_file(monkeypatch, tmp_path):
    monkeypatch.setattr(config_module, "DEFAULT_CONFIG_PATH", tmp_path / "absent.toml")
    assert load_config() == EngineConfig()


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("[engine]\nmax_bach = 2", "unknown key 'max_bach'"),
        ("[engine]\nmax_batch = \"2\"", "max_batch: must be an integer"),
        ("[engine]\nmax_batch = true", "max_batch: must be an integer"),
        ("[engine]\nmax_batch = 0", "max_batch: must be in [1, 1024]"),
        ("[engine]\ngrace_s = -1", "grace_s: must be >= 0"),
        ("[engine]\nlog_level = \"loud\"", "log_level: must be one of"),
        ("[engine]\nwarmup_prompts = [3]", "warmup_prompts[0]"),
        ("[engine]\nwarmup_prompts = [{ user = \"x\" }]", "warmup_prompts[0]"),
        ("[engine]\nmax_frame_bytes = 10", "max_frame_bytes"),
        ("[engine]\nkv_dtype = \"int8\"", "kv_dtype: must be one of 'fp32', 'fp16', got 'int8'"),
        ("[engine]\ndevice = \"tensorrt\"\nkv_dtype = \"fp16\"", "kv_dtype: the tensorrt device keeps its KV cache in fp32"),
        ("engine = 3", "engine must be a table"),
        ("[engine\n", "invalid TOML"),
    ],
)
def test_bad_config_names_the_key(tmp_path, text, fragment):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert fragment in str(info.value) and str(path) in str(info.value)


def test_kv_dtype_is_unset_unless_given_and_the_serve_flag_overrides_it(tmp_path):
    assert EngineConfig().kv_dtype is None  # unset: the recipe's kv_dtype, else fp32 (models.resolve_model)
    cfg = load_config(_write(tmp_path, '[engine]\nkv_dtype = "fp16"\n'))
    assert cfg.kv_dtype == "fp16"
    args = _parser().parse_args(["serve", "--kv-dtype", "fp32"])
    assert cfg.with_overrides(**{key: getattr(args, key) for key in _SERVE_OVERRIDES}).kv_dtype == "fp32"


def test_overrides_win_and_are_validated():
    cfg = EngineConfig(max_batch=2).with_overrides(max_batch=6, model=None)
    assert cfg.max_batch == 6 and cfg.model is None
    with pytest.raises(ConfigError, match="queue_size"):
        cfg.with_overrides(queue_size=0)


def test_default_socket_path(monkeypatch):
    for name in ("RUNTIME_DIRECTORY", "INVOCATION_ID", "XDG_RUNTIME_DIR"):
        monkeypatch.delenv(name, raising=False)
    assert str(default_socket_path()).startswith("/tmp/edge-runtime-")
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    assert default_socket_path() == Path("/run/user/1000/edge-runtime/engine.sock")
    monkeypatch.setenv("INVOCATION_ID", "abc")
    assert default_socket_path() == Path("/run/edge-runtime/engine.sock")
    monkeypatch.setenv("RUNTIME_DIRECTORY", "/run/edge-runtime-x")
    assert default_socket_path() == Path("/run/edge-runtime-x/engine.sock")


# A uid no one on the test machine uses: its /tmp/edge-runtime-$UID is ours to squat and clean up.
SQUAT_UID = 54329


def _as_victim() -> str:
    """In a forked child running as SQUAT_UID (the modules are loaded already: the child need not
    read root's files): start the engine's socket setup, then connect as a client would."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report on the pipe, never return into pytest
        lines = []
        try:
            os.setgid(SQUAT_UID)
            os.setuid(SQUAT_UID)
            path = default_socket_path()
            try:
                prepare_socket_path(path)
                lines.append("engine: ok")
            except EdgeRuntimeError as exc:
                lines.append(f"engine: {exc}")
            try:
                asyncio.run(EngineClient.connect(path))
            except OSError as exc:
                lines.append(f"client: {type(exc).__name__}: {exc}")
        finally:
            os.write(write_end, "\n".join(lines).encode())
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as f:
        out = f.read()
    os.waitpid(pid, 0)
    return out


@pytest.mark.skipif(os.getuid() != 0, reason="playing two users (a squatter and a victim) needs root")
@pytest.mark.parametrize("squat", ["other owner", "world-writable", "symlink", "none"])
def test_a_squatted_fallback_socket_directory_is_refused(squat, tmp_path, monkeypatch):
    """The victim (SQUAT_UID) starts the engine with the /tmp fallback; the squatter (root here)
    made the directory first. The engine refuses it, and so does a client about to connect."""
    for name in ("RUNTIME_DIRECTORY", "INVOCATION_ID", "XDG_RUNTIME_DIR"):
        monkeypatch.delenv(name, raising=False)
    directory = Path(f"/tmp/edge-runtime-{SQUAT_UID}")
    shutil.rmtree(directory, ignore_errors=True)
    directory.unlink(missing_ok=True)
    try:
        if squat == "other owner":
            directory.mkdir(mode=0o755)  # root's: the socket inside would be root's choice
        elif squat == "world-writable":
            directory.mkdir()
            os.chown(directory, SQUAT_UID, SQUAT_UID)
            directory.chmod(0o777)
        elif squat == "symlink":
            (tmp_path / "elsewhere").mkdir()
            directory.symlink_to(tmp_path / "elsewhere")
        out = _as_victim()
        if squat == "none":  # nobody got there first: made 0700, ours; no engine yet, so the client finds no socket
            st = os.lstat(directory)
            assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (SQUAT_UID, 0o700)
            assert "engine: ok" in out and "client: FileNotFoundError" in out
            return
        reason = {"other owner": f"owned by uid 0, not by this user ({SQUAT_UID})", "world-writable": "mode 0777 lets others write to it",
                  "symlink": "not a directory"}[squat]
        assert f"engine: {directory}: {reason}" in out and "refusing it for the engine socket" in out
        assert f"client: UnsafeSocketDir: {directory}: {reason}" in out
    finally:
        shutil.rmtree(directory, ignore_errors=True)
        directory.unlink(missing_ok=True)
