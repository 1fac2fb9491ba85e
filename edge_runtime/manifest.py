"""manifest.json: what a built model directory holds (written by the builder, read by backends)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"


def read_manifest(model_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((Path(model_dir) / MANIFEST).read_text())
    except (FileNotFoundError, NotADirectoryError, ValueError):
        return None
