"""ModelSpec: the architecture facts the graph writer needs, read from any checkpoint kind."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

ARCHITECTURES = ("llama", "glm", "glm4")


@dataclass(frozen=True)
class ModelSpec:
    arch: str  # one of ARCHITECTURES
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    rotary_dim: int  # < head_dim for partial rotary (GLM rotates half of each head)
    rope_interleaved: bool  # GLM rotates adjacent pairs; Llama rotates the two halves
    max_context: int
    qkv_bias: bool
    tie_word_embeddings: bool
    rope_scaling: dict[str, Any] = field(default_factory=dict)  # llama3-style, when present

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelSpec":
        return cls(**d)
