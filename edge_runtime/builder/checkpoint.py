"""Read a checkpoint (GGUF file or Hugging Face directory) into a ModelSpec and weights under
one canonical naming, so the graph writer never sees a file format.

Canonical names: `embed` [V,H], `norm` [H], `lm_head` [V,H] (absent when tied) and per layer
`l{i}.attn_norm`, `l{i}.q|k|v|o` ([out,in]), `l{i}.q_bias|k_bias|v_bias`, `l{i}.mlp_norm`,
`l{i}.gate|up|down`, and for glm4 `l{i}.post_attn_norm|post_mlp_norm`. Attention weights are in
the Hugging Face layout (GGUF's Llama q/k row permutation is undone here).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CheckpointError
from .safetensors_reader import SafetensorsFile
from .spec import ModelSpec

# Hugging Face model_type -> our architecture; qwen2 is Llama-shaped with qkv bias.
_HF_MODEL_TYPES = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "glm": "glm", "glm4": "glm4"}
_GGUF_ARCHS = {"llama": "llama", "qwen2": "llama"}


class Checkpoint:
    """A loaded checkpoint: its spec, where it came from, and lazy access to its weights."""

    def __init__(self, path: Path, spec: ModelSpec, getter: Callable[[str], np.ndarray | None]) -> None:
        self.path = path
        self.spec = spec
        self._get = getter

    def weight(self, name: str) -> np.ndarray:
        arr = self._get(name)
        if arr is None:
            raise CheckpointError(f"{self.path}: missing tensor for {name!r}")
        return np.ascontiguousarray(arr, dtype=np.float32)

    def optional(self, name: str) -> np.ndarray | None:
        arr = self._get(name)
        return None if arr is None else np.ascontiguousarray(arr, dtype=np.float32)


def load_checkpoint(source: Path, arch: str | None = None) -> Checkpoint:
    source = Path(source)
    if not source.exists():
        raise CheckpointError(f"{source}: no such file or directory")
    if source.is_dir():
        return _load_hf_dir(source, arch)
    return _load_gguf(source, arch)


def source_files(source: Path) -> list[Path]:
    """The files whose bytes define a checkpoint (hashed for the build cache key)."""
    source = Path(source)
    if source.is_file():
        return [source]
    return sorted(p for p in source.iterdir() if p.is_file() and p.suffix in (".json", ".safetensors", ".model", ".jinja"))


def checksum(source: Path, progress: Callable[[int, int], None] | None = None) -> str:
    return files_sha256(source_files(source), progress)


def files_sha256(files: list[Path], progress: Callable[[int, int], None] | None = None) -> str:
    """One digest over the files' names and bytes, in the order given."""
    total = sum(p.stat().st_size for p in files)
    digest = hashlib.sha256()
    done = 0
    for path in files:
        digest.update(path.name.encode())
        with path.open("rb") as f:
            for block in iter(lambda: f.read(8 << 20), b""):
                digest.update(block)
                done += len(block)
                if progress:
                    progress(done, total)
    return digest.hexdigest()


# --- Hugging Face directory -------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except ValueError as exc:
        raise CheckpointError(f"{path}: invalid JSON ({exc})") from None


def _rope_params(cfg: dict[str, Any]) -> tuple[float, float, dict[str, Any]]:
    """(theta, partial_rotary_factor, scaling) from either the transformers 4.x or 5.x config form."""
    rp = cfg.get("rope_parameters") or {}
    theta = rp.get("rope_theta", cfg.get("rope_theta", 10000.0))
    partial = rp.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    scaling = cfg.get("rope_scaling") or {}
    if rp.get("rope_type", "default") != "default":
        scaling = rp
    return float(theta), float(partial), _check_scaling(scaling)


def _check_scaling(scaling: dict[str, Any]) -> dict[str, Any]:
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind in (None, "default"):
        return {}
    if kind != "llama3":
        raise CheckpointError(f"unsupported rope scaling type {kind!r} (supported: default, llama3)")
    return {k: float(scaling[k]) for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


def _hf_spec(cfg_path: Path, cfg: dict[str, Any], arch: str | None) -> ModelSpec:
    model_type = cfg.get("model_type")
    detected = _HF_MODEL_TYPES.get(model_type)
    if arch is None:
        if detected is None:
            raise CheckpointError(
                f"{cfg_path}: unsupported architecture {model_type!r} (supported model types: {', '.join(_HF_MODEL_TYPES)})"
            )
        arch = detected
    elif detected != arch:
        raise CheckpointError(f"{cfg_path}: model_type {model_type!r} does not match --arch {arch}")
    try:
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        head_dim = int(cfg.get("head_dim") or hidden // heads)
        theta, partial, scaling = _rope_params(cfg)
        return ModelSpec(
            arch=arch,
            hidden_size=hidden,
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=head_dim,
            intermediate_size=int(cfg["intermediate_size"]),
            vocab_size=int(cfg["vocab_size"]),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rotary_dim=int(head_dim * partial),
            rope_interleaved=arch in ("glm", "glm4"),
            max_context=int(cfg.get("max_position_embeddings", 4096)),
            qkv_bias=bool(cfg.get("attention_bias", model_type == "qwen2")),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            rope_scaling=scaling,
        )
    except KeyError as exc:
        raise CheckpointError(f"{cfg_path}: missing config key {exc.args[0]!r}") from None


def _hf_names(spec: ModelSpec) -> dict[str, str]:
    names = {"embed": "model.embed_tokens.weight", "norm": "model.norm.weight", "lm_head": "lm_head.weight"}
    for i in range(spec.num_layers):
        p = f"model.layers.{i}."
        names.update({
            f"l{i}.attn_norm": p + "input_layernorm.weight",
            f"l{i}.mlp_norm": p + "post_attention_layernorm.weight",
            f"l{i}.down": p + "mlp.down_proj.weight",
        })
        for w in "qkvo":
            names[f"l{i}.{w}"] = p + f"self_attn.{w}_proj.weight"
        for w in "qkv":
            names[f"l{i}.{w}_bias"] = p + f"self_attn.{w}_proj.bias"
        if spec.arch == "llama":
            names[f"l{i}.gate"] = p + "mlp.gate_proj.weight"
            names[f"l{i}.up"] = p + "mlp.up_proj.weight"
        if spec.arch == "glm4":
            names[f"l{i}.post_attn_norm"] = p + "post_self_attn_layernorm.weight"
            names[f"l{i}.post_mlp_norm"] = p + "post_mlp_layernorm.weight"
    return names


def _load_hf_dir(directory: Path, arch: str | None) -> Checkpoint:
    cfg = _read_json(directory / "config.json")
    spec = _hf_spec(directory / "config.json", cfg, arch)
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{directory}: no *.safetensors weight files")
    index: dict[str, SafetensorsFile] = {}
    for path in files:
        st = SafetensorsFile(path)
        index.update({name: st for name in st.names()})
    names = _hf_names(spec)

    def get(name: str) -> np.ndarray | None:
        if name.endswith((".gate", ".up")) and spec.arch in ("glm", "glm4"):
            fused = get_hf(names[name.rsplit(".", 1)[0] + ".down"].replace("down_proj", "gate_up_proj"))
            if fused is None:
                return None
            gate, up = np.split(fused, 2, axis=0)  # GlmMLP: gate first, then up
            return gate if name.endswith(".gate") else up
        return get_hf(names.get(name, name))

    def get_hf(hf_name: str) -> np.ndarray | None:
        st = index.get(hf_name)
        return None if st is None else st.get(hf_name)

    return Checkpoint(directory, spec, get)


# --- GGUF --------------------------------------------------------------------------------


def _gguf_reader(path: Path):
    import gguf

    try:
        return gguf.GGUFReader(path)
    except Exception as exc:  # the reader raises ValueError, IndexError, struct errors...
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path}: not a valid GGUF file ({detail})") from None


def gguf_field(reader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _gguf_spec(path: Path, reader, arch: str | None) -> ModelSpec:
    gguf_arch = gguf_field(reader, "general.architecture")
    detected = _GGUF_ARCHS.get(gguf_arch)
    if detected is None or (arch is not None and arch != detected):
        raise CheckpointError(
            f"{path}: unsupported GGUF architecture {gguf_arch!r}"
            + (f" for --arch {arch}" if arch else "")
            + f" (GGUF supports: {', '.join(_GGUF_ARCHS)}; build GLM models from their Hugging Face directory)"
        )

    def key(name: str, default: Any = KeyError) -> Any:
        value = gguf_field(reader, f"{gguf_arch}.{name}", None)
        if value is None:
            if default is KeyError:
                raise CheckpointError(f"{path}: missing GGUF metadata {gguf_arch}.{name}")
            return default
        return value

    hidden, heads = int(key("embedding_length")), int(key("attention.head_count"))
    head_dim = int(key("attention.key_length", hidden // heads))
    tensor_names = {t.name for t in reader.tensors}
    vocab = key("vocab_size", None) or len(gguf_field(reader, "tokenizer.ggml.tokens", []))
    return ModelSpec(
        arch=detected,
        hidden_size=hidden,
        num_layers=int(key("block_count")),
        num_heads=heads,
        num_kv_heads=int(key("attention.head_count_kv", heads)),
        head_dim=head_dim,
        intermediate_size=int(key("feed_forward_length")),
        vocab_size=int(vocab),
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(key("rope.freq_base", 10000.0)),
        rotary_dim=int(key("rope.dimension_count", head_dim)),
        rope_interleaved=False,
        max_context=int(key("context_length", 4096)),
        qkv_bias="blk.0.attn_q.bias" in tensor_names,
        tie_word_embeddings="output.weight" not in tensor_names,
        rope_scaling=_gguf_rope_scaling(path, reader, key),
    )


def _gguf_rope_scaling(path: Path, reader, key: Callable[..., Any]) -> dict[str, Any]:
    """Rope scaling as a GGUF states it: Llama 3.1/3.2 converters store the per-frequency
    divisors as the tensor rope_freqs.weight (not as metadata); linear scaling is metadata.
    Anything else is refused rather than built with wrong positions."""
    kind = key("rope.scaling.type", "none")
    scaling: dict[str, Any] = {}
    if kind == "linear":
        scaling["linear_factor"] = float(key("rope.scaling.factor"))
    elif kind not in ("none", ""):
        raise CheckpointError(f"{path}: unsupported rope scaling type {kind!r} (supported: none, linear, and Llama 3's rope_freqs)")
    freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if freqs is not None:
        scaling["freq_factors"] = [float(x) for x in np.asarray(freqs.data, dtype=np.float32).reshape(-1)]
    return scaling


def _gguf_names(spec: ModelSpec) -> dict[str, str]:
    names = {"embed": "token_embd.weight", "norm": "output_norm.weight", "lm_head": "output.weight"}
    per_layer = {
        "attn_norm": "attn_norm.weight", "mlp_norm": "ffn_norm.weight",
        "q": "attn_q.weight", "k": "attn_k.weight", "v": "attn_v.weight", "o": "attn_output.weight",
        "q_bias": "attn_q.bias", "k_bias": "attn_k.bias", "v_bias": "attn_v.bias",
        "gate": "ffn_gate.weight", "up": "ffn_up.weight", "down": "ffn_down.weight",
    }
    for i in range(spec.num_layers):
        names.update({f"l{i}.{ours}": f"blk.{i}.{theirs}" for ours, theirs in per_layer.items()})
    return names


def _unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (it makes HF's half-rotation an interleaved one)."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def _load_gguf(path: Path, arch: str | None) -> Checkpoint:
    from gguf.quants import dequantize

    reader = _gguf_reader(path)
    spec = _gguf_spec(path, reader, arch)
    tensors = {t.name: t for t in reader.tensors}
    names = _gguf_names(spec)
    permuted = gguf_field(reader, "general.architecture") == "llama"

    def get(name: str) -> np.ndarray | None:
        t = tensors.get(names.get(name, name))
        if t is None:
            return None
        try:
            arr = dequantize(t.data, t.tensor_type)
        except (NotImplementedError, ValueError) as exc:
            raise CheckpointError(f"{path}: cannot read tensor {t.name} ({exc})") from None
        arr = arr.reshape([int(d) for d in reversed(t.shape)])
        if permuted and name.endswith((".q", ".k", ".q_bias", ".k_bias")):
            heads = spec.num_heads if ".q" in name else spec.num_kv_heads
            arr = _unpermute_rows(arr, heads)
        return arr

    return Checkpoint(path, spec, get)
