"""Extract the part of OpenAI's published OpenAPI description that tests/test_openai_conformance.py
validates the sidecar's responses against, into tests/data/openai_openapi_subset.json.

The description is https://github.com/openai/openai-openapi (file `openapi.yaml`, MIT licence).
CI has no network, so the test reads this committed extract: the component schemas of the
responses the sidecar serves (ROOTS) and every schema they `$ref`, transitively, copied verbatim,
under `components.schemas` so the `#/components/schemas/...` references resolve inside the file.
A `source` field names the repository, file, commit and licence.

To refresh it (needs PyYAML):

    git clone https://github.com/openai/openai-openapi /tmp/openai-openapi
    python tests/data/extract_openai_schemas.py /tmp/openai-openapi

then rerun the conformance test and read what changed with `git diff tests/data/`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path
from typing import Any, Iterator

import yaml

REPOSITORY = "https://github.com/openai/openai-openapi"
SPEC_FILE = "openapi.yaml"
ROOTS = ("CreateChatCompletionResponse", "CreateChatCompletionStreamResponse", "CreateCompletionResponse",
         "ListModelsResponse", "Model", "ErrorResponse")
PREFIX = "#/components/schemas/"
OUTPUT = Path(__file__).with_name("openai_openapi_subset.json")


def refs(node: Any) -> Iterator[str]:
    """Every `$ref` target under a schema node."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from refs(value)


def closure(schemas: dict[str, Any], roots: tuple[str, ...]) -> dict[str, Any]:
    """The named schemas and all they reference, sorted by name (a stable, diffable file)."""
    keep: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in keep:
            continue
        keep.add(name)
        for ref in refs(schemas[name]):
            if not ref.startswith(PREFIX):  # the file would not resolve it: fail rather than write it
                raise ValueError(f"{name}: reference outside components.schemas: {ref}")
            todo.append(ref[len(PREFIX):])
    return {name: schemas[name] for name in sorted(keep)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkout", type=Path, help="a git checkout of openai/openai-openapi")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args()
    commit = subprocess.run(["git", "-C", str(args.checkout), "rev-parse", "HEAD"], check=True, capture_output=True,
                            text=True).stdout.strip()
    spec = yaml.safe_load((args.checkout / SPEC_FILE).read_text())
    subset = {
        "source": {
            "repository": REPOSITORY, "file": SPEC_FILE, "commit": commit, "openapi": spec["openapi"],
            "api_version": spec["info"]["version"], "license": "MIT",
            "license_text": (args.checkout / "LICENSE").read_text(),  # MIT: the notice travels with the copy
            "extracted_by": "tests/data/extract_openai_schemas.py", "roots": list(ROOTS),
        },
        "components": {"schemas": closure(spec["components"]["schemas"], ROOTS)},
    }
    args.output.write_text(json.dumps(subset, indent=1, ensure_ascii=False) + "\n")
    print(f"{args.output}: {len(subset['components']['schemas'])} schemas from {REPOSITORY} {SPEC_FILE} @ {commit[:12]}")


if __name__ == "__main__":
    main()
