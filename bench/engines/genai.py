"""Runner for onnxruntime-genai on a model its builder made (bench/prepare_genai.py). Runs in
its own virtualenv. Greedy search; min_length keeps EOS from ending a run early (it masks
EOS, where the other runners just ignore it: only matters if EOS would be the argmax)."""

from __future__ import annotations

import argparse
import json
import time

import harness
import onnxruntime_genai as og


class GenaiEngine:
    def __init__(self, args: argparse.Namespace) -> None:
        config = og.Config(str(args.model))
        threads = {"intra_op_num_threads": args.threads, "inter_op_num_threads": 1}
        config.overlay(json.dumps({"model": {"decoder": {"session_options": threads}}}))
        self.model = og.Model(config)
        self.tokenizer = og.Tokenizer(self.model)
        self.ctx = args.ctx
        self.version = f"onnxruntime-genai {og.__version__}"

    def run(self, prompt_ids: list[int], gen_tokens: int) -> harness.Run:
        params = og.GeneratorParams(self.model)
        params.set_search_options(
            do_sample=False, max_length=self.ctx, min_length=len(prompt_ids) + gen_tokens
        )
        # Allocates the KV cache (max_length long); the other engines do that at load time.
        generator = og.Generator(self.model, params)
        start = time.perf_counter()
        generator.append_tokens(prompt_ids)  # the prefill forward
        generator.generate_next_token()  # picks from the prefill's logits
        tokens = [int(generator.get_next_tokens()[0])]
        first = time.perf_counter()
        for _ in range(gen_tokens - 1):
            generator.generate_next_token()  # forward of the last token, then pick
            tokens.append(int(generator.get_next_tokens()[0]))
        return harness.Run(first - start, time.perf_counter() - first, tokens)

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])


if __name__ == "__main__":
    harness.main(__doc__, GenaiEngine)
