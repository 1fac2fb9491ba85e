"""Warm start (edge_runtime/warm.py): the warm-up before READY=1 runs the model's shapes on
throwaway KV rows and leaves nothing behind: every slot free, no KV memory held, and the same
output as an engine that never warmed up."""

from __future__ import annotations

import numpy as np

from edge_runtime.backends.onnxruntime import OnnxRuntimeBackend
from edge_runtime.generate import generate
from edge_runtime.prepare import RequestPreparer
from edge_runtime.sampling import SamplingParams
from edge_runtime.tokenizer import Tokenizer
from edge_runtime.warm import warm_engine

GREEDY = SamplingParams(max_tokens=16, temperature=0.0)


def test_warm_up_leaves_no_state_behind(tiny_model_dir):
    tokenizer = Tokenizer.from_dir(tiny_model_dir)
    warmed = OnnxRuntimeBackend(tiny_model_dir, max_batch=4)
    preparer = RequestPreparer(tokenizer, warmed.vocab_size)
    assert warm_engine(warmed, preparer, prefill_chunk=300) >= 0  # a chunk past the context is cut to fit
    assert not any(warmed._in_use) and warmed.kv_bytes_allocated() == 0
    assert preparer.grammars._lltok is not None  # the grammar engine's tokenizer view is built

    prompt = tokenizer.encode("the quick brown fox")
    cold = OnnxRuntimeBackend(tiny_model_dir, max_batch=4)
    outputs = [[c.token_id for c in generate(b, tokenizer, prompt, GREEDY)] for b in (warmed, cold)]
    assert outputs[0] == outputs[1]
    assert np.array_equal(warmed.prefill(warmed.allocate(), np.array(prompt)), cold.prefill(cold.allocate(), np.array(prompt)))
