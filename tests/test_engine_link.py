"""The sidecar's engine link on shutdown: `close()` ends its reconnect loop whatever that loop is
waiting on when the cancellation arrives (a hang there kept `runner.cleanup()`, and so the
sidecar's SIGTERM, waiting until its parent SIGKILLed it)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from proxy.core.engine_link import EngineLink


def test_close_ends_the_link_when_a_retry_kick_lands_in_the_same_step(tmp_path: Path):
    """The engine is gone; a request kicks a reconnect attempt in the same loop step in which
    shutdown cancels the link. On Python 3.11 `asyncio.wait_for` returned the kick's result and
    swallowed that cancellation: the loop retried forever and `close()` never returned."""

    async def main() -> None:
        link = EngineLink(tmp_path / "no-engine.sock")
        failed = link._changed  # pulsed when the first attempt has failed
        link.start()
        await failed.wait()  # the link now waits out its backoff, on its kick
        assert not link.connected
        link._kick.set()  # a request asks for an attempt now...
        closing = asyncio.ensure_future(link.close())  # ...and shutdown cancels the link in the same step
        done, _ = await asyncio.wait([closing], timeout=10)  # only a guard against the hang: it returns at once
        assert closing in done, "EngineLink.close() hung: its task swallowed the cancellation"
        assert link._task is not None and link._task.cancelled()

    asyncio.run(main())
