"""The engine daemon's configuration: the `[engine]` table of the shared TOML config file (other
tables belong to the sidecar), a Table of the config convention (edge_wire/settings.py)."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Annotated, Literal, get_args

from msgspec import Meta

from edge_wire.frames import DEFAULT_MAX_FRAME
from edge_wire.settings import (
    ConfigError,
    LogLevel,
    Table,
    Text,
    load_table,
    read_config_file,
)

from .errors import EdgeRuntimeError

SOCKET_NAME = "engine.sock"

Device = Literal["cpu", "cuda", "tensorrt"]  # where the model runs; never guessed (backends/providers.py)
DEVICES: tuple[str, ...] = get_args(Device)
KvDtype = Literal["fp32", "fp16"]  # the KV cache's element type, a build option (builder/build.py)

# A prefix cached at start: raw prompt text, or {system = "..."} rendered with the chat template.
WarmupPrompt = Text | Annotated[dict[Literal["system"], Text], Meta(min_length=1)]


class EngineConfig(Table):
    model: Annotated[Text | None, Meta(
        description="a recipe name, built model directory or checkpoint (default: the default model)",
        examples=["smollm2-135m-instruct"])] = None
    socket_path: Annotated[Text | None, Meta(
        description="default: $RUNTIME_DIRECTORY/engine.sock under systemd",
        examples=["/run/edge-runtime/engine.sock"])] = None
    max_batch: Annotated[int, Meta(ge=1, le=1024, description=(
        "sequences decoded together (KV slots; KV memory grows only with the tokens held)"))] = 8
    max_context: Annotated[Annotated[int, Meta(ge=2)] | None, Meta(
        description="tokens per slot (default: the model's)", examples=[2048])] = None
    threads: Annotated[Annotated[int, Meta(ge=1, le=1024)] | None, Meta(
        description="CPU threads (default: ONNX Runtime's choice)", examples=[4])] = None
    device: Annotated[Device, Meta(
        description="where the model runs: cpu, cuda or tensorrt (docs/jetson.md); never guessed")] = "cpu"
    kv_dtype: Annotated[KvDtype | None, Meta(description=(
        "KV cache element type of the model built for the engine: fp32 (fastest on the CPU: ONNX Runtime's CPU "
        "attention converts an fp16 cache every step) or fp16 (half the KV memory per token, llama.cpp's default; "
        "what CUDA attention wants). Default: the recipe's kv_dtype, else fp32; a built model directory must match it"),
        examples=["fp16"])] = None
    trt_workspace_mb: Annotated[int, Meta(ge=1, description="TensorRT's scratch memory limit (device tensorrt)")] = 1024
    queue_size: Annotated[int, Meta(ge=1, description="requests waiting for a slot before the engine answers busy")] = 64
    prefill_chunk: Annotated[int, Meta(ge=1, description="prompt tokens prefilled per step")] = 256
    kv_cache_mb: Annotated[float, Meta(gt=0, description=(
        "KV memory of live sequences and the prefix cache together; requests wait for room "
        "(sizing: docs/engine-performance.md)"))] = 1024.0
    prefix_cache_mb: Annotated[float, Meta(ge=0, description=(
        "the prefix KV cache's cap within kv_cache_mb: it holds what live sequences leave, up to this; 0: off"))] = 64.0
    prefix_block: Annotated[int, Meta(ge=1, le=4096, description="tokens per prefix-cache block")] = 32
    warmup_prompts: Annotated[tuple[WarmupPrompt, ...], Meta(
        description='prefixes cached at start: "raw text" or {system = "..."}')] = ()
    warm_shapes: Annotated[bool, Meta(description=(
        "run each batch size and the prefill chunk once before READY=1 (docs/reliability.md)"))] = True
    grace_s: Annotated[float, Meta(ge=0, description="running streams may finish this long after SIGTERM")] = 30.0
    max_frame_bytes: Annotated[int, Meta(ge=4096, le=64 << 20, description="largest engine protocol frame")] = DEFAULT_MAX_FRAME
    max_connections: Annotated[int, Meta(ge=1, le=65536, description=(
        "socket connections held at once; past it the longest idle one is closed (docs/reliability.md)"))] = 128
    idle_timeout_s: Annotated[float, Meta(ge=0, description=(
        "a connection with no stream in flight and no frame for this long is closed; 0: never"))] = 600.0
    frame_timeout_s: Annotated[float, Meta(gt=0, description=(
        "a frame begun must be complete within this, or the connection is closed"))] = 10.0
    log_level: Annotated[LogLevel, Meta(description="debug, info, warning or error")] = "info"

    def check(self) -> None:
        if self.device == "tensorrt" and self.kv_dtype == "fp16":
            raise ConfigError("kv_dtype: the tensorrt device keeps its KV cache in fp32 (TensorRT picks its own precision)")

    def resolved_socket_path(self) -> Path:
        return Path(self.socket_path) if self.socket_path else default_socket_path()


def default_socket_path() -> Path:
    """$RUNTIME_DIRECTORY (systemd's RuntimeDirectory=), /run/edge-runtime under systemd, else the
    user's runtime directory, else a per-user directory in /tmp."""
    runtime_dir = os.environ.get("RUNTIME_DIRECTORY")
    if runtime_dir:
        return Path(runtime_dir.split(":")[0]) / SOCKET_NAME
    if os.environ.get("INVOCATION_ID"):  # set by systemd for every unit it starts
        return Path("/run/edge-runtime") / SOCKET_NAME
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "edge-runtime" / SOCKET_NAME
    return fallback_socket_dir() / SOCKET_NAME


def fallback_socket_dir() -> Path:
    """The per-user directory in /tmp: anyone may create it first, so it is checked before use."""
    return Path(f"/tmp/edge-runtime-{os.getuid()}")


class UnsafeSocketDir(EdgeRuntimeError, PermissionError):
    """A socket directory someone else controls: whoever does could swap the socket and read prompts."""


def check_socket_dir(directory: Path, *, create: bool) -> None:
    """For the /tmp fallback only (other places are the system's or the user's own): create it
    0700 when `create`, and refuse it unless it is a real directory of ours that nobody else
    may write to. A client checks too, so it never talks to a socket planted by another user."""
    if Path(directory) != fallback_socket_dir():
        return
    if create:
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:
            pass
        except OSError as exc:
            raise UnsafeSocketDir(f"{directory}: cannot create the socket directory ({exc.strerror or exc})") from None
    try:
        st = os.lstat(directory)
    except FileNotFoundError:
        return  # nothing there yet: nothing to trust or distrust
    uid = os.getuid()
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeSocketDir(f"{directory}: not a directory (a symlink or file someone put there?); refusing it for the engine socket")
    if st.st_uid != uid:
        raise UnsafeSocketDir(f"{directory}: owned by uid {st.st_uid}, not by this user ({uid}); refusing it for the engine socket "
                              "(another user could swap the socket and read prompts). Remove it, or set [engine] socket_path")
    if st.st_mode & 0o022:
        raise UnsafeSocketDir(f"{directory}: mode {stat.S_IMODE(st.st_mode):04o} lets others write to it; refusing it for the "
                              "engine socket (chmod 700 it, or remove it)")


def load_config(path: Path | None = None) -> EngineConfig:
    """The config at `path`; without one, /etc/edge-runtime/config.toml if present, else defaults."""
    data, path = read_config_file(path)
    return load_table(EngineConfig, data, "engine", path)
