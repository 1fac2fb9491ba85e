"""The console and file span exporters of `[tracing]`: each span as one JSON line (OpenTelemetry's
own JSON form of a span), on stderr or appended to a file. A batch is one write() on an O_APPEND
descriptor, so the engine and the sidecar, which read the same `[tracing]` table, can share one
file without their lines interleaving. Imported only when tracing is on with such an exporter."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from edge_wire.settings import ConfigError


class JsonLinesExporter(SpanExporter):
    def __init__(self, fd: int, owned: bool) -> None:
        self._fd = fd
        self._owned = owned  # a file this exporter opened (and closes); not stderr

    @classmethod
    def to_stderr(cls) -> JsonLinesExporter:
        return cls(sys.stderr.fileno(), owned=False)

    @classmethod
    def to_file(cls, path: Path) -> JsonLinesExporter:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        except OSError as exc:
            raise ConfigError(f"[tracing] path: cannot open {path} for appending ({exc.strerror})") from None
        return cls(fd, owned=True)

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        data = "".join(span.to_json(indent=None) + "\n" for span in spans).encode()
        try:
            while data:
                data = data[os.write(self._fd, data):]
        except OSError:
            return SpanExportResult.FAILURE  # a full disk loses spans, never a request
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        if self._owned and self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True  # nothing is buffered here: each batch is written as it comes
