"""Runner for our engine: a built model directory, through edge_runtime.generate (the path
requests take: sampler, incremental detokenizer and stop matcher included)."""

from __future__ import annotations

import argparse
from importlib.metadata import version

import harness
import onnxruntime

from edge_runtime.backends.onnxruntime import OnnxRuntimeBackend
from edge_runtime.generate import generate
from edge_runtime.sampling import SamplingParams
from edge_runtime.tokenizer import Tokenizer


class EdgeEngine:
    def __init__(self, args: argparse.Namespace) -> None:
        self.tokenizer = Tokenizer.from_dir(args.model)  # first, as LocalModel does: lower peak RSS
        self.backend = OnnxRuntimeBackend(args.model, max_batch=1, max_context=args.ctx, threads=args.threads)
        self.version = f"edge-runtime {version('edge-runtime')}, onnxruntime {onnxruntime.__version__}"

    def run(self, prompt_ids: list[int], gen_tokens: int) -> harness.Run:
        params = SamplingParams(max_tokens=gen_tokens, temperature=0.0, ignore_eos=True)
        tokens = []
        for chunk in generate(self.backend, self.tokenizer, prompt_ids, params):
            tokens.append(chunk.token_id)
        t = chunk.timings
        return harness.Run(t.ttft_s, t.total_s - t.ttft_s, tokens)

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])


if __name__ == "__main__":
    harness.main(__doc__, EdgeEngine)
