"""The real engine daemon in-process: the server and scheduler on their own event-loop thread,
as `edge-runtime serve` runs them, optionally slowed down so a stream lasts long enough to
interfere with. Shared by the engine and sidecar tests."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

from edge_runtime.backends.onnxruntime import OnnxRuntimeBackend
from edge_runtime.scheduler import Scheduler
from edge_runtime.server import EngineServer, model_info
from edge_runtime.tokenizer import Tokenizer


class SlowBackend:
    """The real backend, with a pause per forward so a stream lasts long enough to interfere with."""

    def __init__(self, backend: OnnxRuntimeBackend, delay_s: float) -> None:
        self._backend, self._delay = backend, delay_s

    def __getattr__(self, name):
        return getattr(self._backend, name)

    def prefill(self, slot, token_ids):
        time.sleep(self._delay)
        return self._backend.prefill(slot, token_ids)

    def decode(self, slots, token_ids):
        time.sleep(self._delay)
        return self._backend.decode(slots, token_ids)


class Engine:
    """The real server and scheduler on their own event loop thread, as `serve` runs them."""

    def __init__(self, model_dir: Path, socket_path: Path, *, max_batch=2, queue_size=64, delay_s=0.0, prefix_cache_bytes=0,
                 **server_kw):
        backend = OnnxRuntimeBackend(model_dir, max_batch=max_batch)
        self.tokenizer = Tokenizer.from_dir(model_dir)
        info = model_info(None, model_dir, backend, self.tokenizer)
        self.scheduler = Scheduler(SlowBackend(backend, delay_s) if delay_s else backend, self.tokenizer, queue_size=queue_size,
                                   prefix_cache_bytes=prefix_cache_bytes, model_info=info)
        self.socket_path = socket_path
        self._server_args = (info, socket_path)
        self._server_kw = {"max_frame_bytes": 1 << 20, "grace_s": 5.0, **server_kw}
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._ready = threading.Event()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = EngineServer(self.scheduler, self.tokenizer, *self._server_args, **self._server_kw)
        self.loop.run_until_complete(self.server.start())
        self._ready.set()
        self.loop.run_until_complete(self.server.wait_stopped())
        self.loop.close()

    def __enter__(self) -> Engine:
        self.scheduler.start()
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def call(self, fn, *args) -> None:
        self.loop.call_soon_threadsafe(fn, *args)

    def stop(self) -> None:
        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self.server.shutdown(), self.loop).result(30)
            self._thread.join(10)

    def __exit__(self, *exc) -> None:
        self.stop()
