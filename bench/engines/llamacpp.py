"""Runner for llama.cpp (llama-cpp-python) on the GGUF file itself. Prefill is one
`Llama.eval` of the whole prompt (batches of 512); each decode step is an eval of one token;
the next token is the argmax of the last logits row, as in the other runners."""

from __future__ import annotations

import argparse
import os
import time

import harness
import llama_cpp
import numpy as np


def _without_repacking() -> None:
    """LLAMA_ARG_REPACK=0 (llama-server's own switch for it) turns off llama.cpp's weight
    repacking and extra CPU buffer types, as `llama-server --no-repack` does: on some machines
    (an AMX-capable Xeon here) those crash at the first batched eval."""
    defaults = llama_cpp.llama_cpp.llama_model_default_params

    def params():
        p = defaults()
        p.use_extra_bufts = False
        return p

    llama_cpp.llama_cpp.llama_model_default_params = params


class LlamaCppEngine:
    def __init__(self, args: argparse.Namespace) -> None:
        if os.environ.get("LLAMA_ARG_REPACK", "").lower() in ("0", "false", "off"):
            _without_repacking()
        self.llm = llama_cpp.Llama(
            model_path=str(args.model), n_ctx=args.ctx, n_threads=args.threads,
            n_threads_batch=args.threads, n_batch=512, verbose=False,
        )
        self.n_vocab = self.llm.n_vocab()
        self.version = f"llama-cpp-python {llama_cpp.__version__}, repack {os.environ.get('LLAMA_ARG_REPACK', 'on')}"

    def _argmax(self) -> int:
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.llm.ctx, -1), shape=(self.n_vocab,))
        return int(np.argmax(logits))

    def run(self, prompt_ids: list[int], gen_tokens: int) -> harness.Run:
        self.llm.reset()  # the next eval drops the cached sequence
        start = time.perf_counter()
        self.llm.eval(prompt_ids)
        tokens = [self._argmax()]
        first = time.perf_counter()
        for _ in range(gen_tokens - 1):
            self.llm.eval([tokens[-1]])
            tokens.append(self._argmax())
        return harness.Run(first - start, time.perf_counter() - first, tokens)

    def token_text(self, token_id: int) -> str:
        return self.llm.detokenize([token_id]).decode("utf-8", errors="replace")


if __name__ == "__main__":
    harness.main(__doc__, LlamaCppEngine)
