"""LocalModel: a built model loaded for generation in this process (backend + tokenizer)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .backends.onnxruntime import OnnxRuntimeBackend
from .generate import GenerationChunk, generate
from .sampling import SamplingParams
from .tokenizer import Tokenizer


class LocalModel:
    def __init__(self, model_dir: Path, max_batch: int = 1, max_context: int | None = None, threads: int | None = None) -> None:
        self.model_dir = Path(model_dir)
        self.tokenizer = Tokenizer.from_dir(self.model_dir)  # first: see OnnxRuntimeBackend
        self.backend = OnnxRuntimeBackend(self.model_dir, max_batch=max_batch, max_context=max_context, threads=threads)

    def complete(self, prompt: str, params: SamplingParams) -> Iterator[GenerationChunk]:
        """Plain completion of the text (no chat template)."""
        return generate(self.backend, self.tokenizer, self.tokenizer.encode(prompt), params)

    def chat(self, messages: list[dict[str, Any]], params: SamplingParams) -> Iterator[GenerationChunk]:
        """Answer a conversation, rendered with the model's own chat template."""
        prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        # The template writes BOS itself where the model wants one.
        return generate(self.backend, self.tokenizer, self.tokenizer.encode(prompt, add_special_tokens=False), params)
