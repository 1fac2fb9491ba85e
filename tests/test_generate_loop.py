"""The generation loop against a real (tiny) model: a numpy bigram table behind the Backend
protocol, and a byte-level BPE tokenizer trained on the spot."""

import numpy as np
import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from edge_runtime.errors import ContextLengthExceeded, InvalidRequest
from edge_runtime.generate import generate, generate_text
from edge_runtime.sampling import SamplingParams
from edge_runtime.tokenizer import Tokenizer

EOS = "<|endoftext|>"

CORPUS = [
    "hello world, the quick brown fox jumps over the lazy dog.",
    "héllo wörld — naïve café, déjà vu; 日本語のテキスト 😀🎉",
    "stop here. the end is near, the end is here.",
] * 20


class BigramBackend:
    """logits = table[last token]; KV 'cache' = the token list per slot."""

    def __init__(self, table: np.ndarray, max_context: int = 256, max_batch: int = 2) -> None:
        self.table = table
        self.vocab_size = table.shape[0]
        self.max_context, self.max_batch = max_context, max_batch
        self.slots: dict[int, list[int]] = {}
        self.allocations = 0
        self.prefill_sizes: list[int] = []
        self.fail_on_decode = False

    def allocate(self) -> int:
        free = [s for s in range(self.max_batch) if s not in self.slots]
        if not free:
            raise RuntimeError("no free slot")
        self.slots[free[0]] = []
        self.allocations += 1
        return free[0]

    def free(self, slot: int) -> None:
        del self.slots[slot]

    def seq_len(self, slot: int) -> int:
        return len(self.slots[slot])

    def _append(self, slot: int, ids: list[int]) -> np.ndarray:
        self.slots[slot].extend(ids)
        assert len(self.slots[slot]) <= self.max_context, "context overflow"
        return self.table[self.slots[slot][-1]].copy()

    def prefill(self, slot: int, token_ids: np.ndarray) -> np.ndarray:
        assert token_ids.ndim == 1 and len(token_ids) > 0
        self.prefill_sizes.append(len(token_ids))
        return self._append(slot, token_ids.tolist())

    def decode(self, slots: list[int], token_ids: list[int]) -> np.ndarray:
        if self.fail_on_decode:
            raise RuntimeError("device lost")
        return np.stack([self._append(s, [t]) for s, t in zip(slots, token_ids)])


@pytest.fixture(scope="module")
def raw_tokenizer() -> tokenizers.Tokenizer:
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok


@pytest.fixture(scope="module")
def tokenizer(raw_tokenizer: tokenizers.Tokenizer) -> Tokenizer:
    tok = Tokenizer(raw_tokenizer)
    assert tok.eos_token_ids == [raw_tokenizer.token_to_id(EOS)]
    return tok


@pytest.fixture(scope="module")
def vocab(tokenizer: Tokenizer) -> int:
    return tokenizer.vocab_size


@pytest.fixture
def table(tokenizer: Tokenizer, vocab: int) -> np.ndarray:
    t = np.random.default_rng(0).normal(0, 1, (vocab, vocab)).astype(np.float32)
    t[:, tokenizer.eos_token_ids[0]] = -10.0  # eos only where a test puts it
    # Random chains stay valid UTF-8: partial characters get their own test.
    partial = [i for i in range(vocab) if "\ufffd" in tokenizer.decode([i])]
    t[:, partial] = -10.0
    return t


def _greedy_chain(table: np.ndarray, last: int, n: int, stop_ids: set[int]) -> list[int]:
    """The reference: what greedy decoding of the bigram model gives, up to a stop id."""
    out: list[int] = []
    while len(out) < n:
        last = int(np.argmax(table[last]))
        out.append(last)
        if last in stop_ids:
            break
    return out


def _run(backend, tokenizer, prompt_ids, **params):
    chunks = list(generate(backend, tokenizer, prompt_ids, SamplingParams(**params)))
    assert all(c.finish_reason is None and c.usage is None for c in chunks[:-1])
    assert chunks[-1].finish_reason is not None and chunks[-1].usage is not None
    return chunks


def test_max_tokens_finishes_with_length(tokenizer, table):
    backend = BigramBackend(table)
    prompt = tokenizer.encode("hello world")
    chunks = _run(backend, tokenizer, prompt, temperature=0, max_tokens=12)
    expected = _greedy_chain(table, prompt[-1], 12, set())
    assert [c.token_id for c in chunks] == expected
    assert "".join(c.text for c in chunks) == tokenizer.decode(expected)
    final = chunks[-1]
    assert final.finish_reason == "length"
    assert (final.usage.prompt_tokens, final.usage.completion_tokens) == (len(prompt), 12)
    assert 0 <= final.timings.ttft_s <= final.timings.total_s
    assert final.timings.decode_tokens_per_s > 0
    assert backend.slots == {}


def test_eos_finishes_with_stop_and_its_text_is_not_emitted(tokenizer, table):
    eos = tokenizer.eos_token_ids[0]
    prompt = tokenizer.encode("the quick")
    chain = _greedy_chain(table, prompt[-1], 6, set())
    table[chain[4], eos] = 100.0  # eos right after the 5th token
    backend = BigramBackend(table)
    chunks = _run(backend, tokenizer, prompt, temperature=0, max_tokens=50)
    expected = _greedy_chain(table, prompt[-1], 50, {eos})
    assert expected[-1] == eos
    assert [c.token_id for c in chunks] == expected
    assert "".join(c.text for c in chunks) == tokenizer.decode(expected[:-1])
    assert chunks[-1].finish_reason == "stop"
    assert chunks[-1].usage.completion_tokens == len(expected)
    assert backend.slots == {}

    chunks = _run(BigramBackend(table), tokenizer, prompt, temperature=0, max_tokens=20,
                  ignore_eos=True)
    assert chunks[-1].finish_reason == "length" and len(chunks) == 20


def test_stop_token_id_finishes_with_stop(tokenizer, table):
    prompt = tokenizer.encode("hello")
    chain = _greedy_chain(table, prompt[-1], 10, set())
    chunks = _run(BigramBackend(table), tokenizer, prompt, temperature=0, max_tokens=10,
                  stop_token_ids=[chain[3]], ignore_eos=True)
    assert [c.token_id for c in chunks] == chain[: chain.index(chain[3]) + 1]
    assert chunks[-1].finish_reason == "stop"


def test_stop_string_cuts_output(tokenizer, table):
    prompt = tokenizer.encode("stop here.")
    full = tokenizer.decode(_greedy_chain(table, prompt[-1], 40, set()))
    stop = full[len(full) // 2 : len(full) // 2 + 3]  # a stop string landing mid-output
    backend = BigramBackend(table)
    chunks = _run(backend, tokenizer, prompt, temperature=0, max_tokens=40, stop=[stop, "never"])
    text = "".join(c.text for c in chunks)
    assert text == full[: full.index(stop)]
    assert chunks[-1].finish_reason == "stop"
    assert backend.slots == {}


def test_multibyte_text_streams_whole_characters(tokenizer, vocab):
    # A chain that spells a string of multi-byte characters, mostly one byte-token at a time.
    target = tokenizer.encode("日本語😀", add_special_tokens=False)
    table = np.full((vocab, vocab), -5.0, dtype=np.float32)
    prompt = tokenizer.encode("x", add_special_tokens=False)
    for a, b in zip(prompt[-1:] + target, target):
        table[a, b] = 5.0
    table[target[-1], tokenizer.eos_token_ids[0]] = 5.0
    chunks = _run(BigramBackend(table), tokenizer, prompt, temperature=0, max_tokens=50)
    assert "".join(c.text for c in chunks) == "日本語😀"
    assert all("\ufffd" not in c.text for c in chunks)


def test_context_end_finishes_with_length(tokenizer, table):
    backend = BigramBackend(table, max_context=20)
    prompt = list(range(1, 16))
    chunks = _run(backend, tokenizer, prompt, temperature=0, max_tokens=100)
    assert len(chunks) == 5  # prompt + completion fill the context exactly
    assert chunks[-1].finish_reason == "length"


def test_too_long_prompt_is_refused_before_allocating(tokenizer, table):
    backend = BigramBackend(table, max_context=16)
    with pytest.raises(ContextLengthExceeded) as err:
        generate(backend, tokenizer, list(range(16)), SamplingParams())
    assert (err.value.prompt_tokens, err.value.max_context) == (16, 16)
    with pytest.raises(InvalidRequest):
        generate(backend, tokenizer, [], SamplingParams())
    with pytest.raises(InvalidRequest):
        generate(backend, tokenizer, [backend.vocab_size], SamplingParams())
    assert backend.allocations == 0


def test_prefill_is_chunked(tokenizer, table, vocab):
    prompt = [i % vocab for i in range(1100)]
    params = SamplingParams(temperature=0, max_tokens=4)
    chunked = BigramBackend(table, max_context=2048)
    chunks = list(generate(chunked, tokenizer, prompt, params))
    assert chunked.prefill_sizes == [512, 512, 76]
    assert chunked.allocations == 1

    whole = BigramBackend(table, max_context=2048)
    same = list(generate(whole, tokenizer, prompt, params, prefill_chunk=2048))
    assert whole.prefill_sizes == [1100]
    assert [c.token_id for c in same] == [c.token_id for c in chunks]


def test_early_close_frees_the_slot(tokenizer, table):
    backend = BigramBackend(table)
    gen = generate(backend, tokenizer, tokenizer.encode("hello"), SamplingParams(max_tokens=50))
    assert backend.allocations == 0  # nothing is taken until the first chunk is asked for
    next(gen)
    next(gen)
    assert len(backend.slots) == 1
    gen.close()
    assert backend.slots == {}


def test_backend_error_frees_the_slot(tokenizer, table):
    backend = BigramBackend(table)
    gen = generate(backend, tokenizer, tokenizer.encode("hello"), SamplingParams(max_tokens=50))
    next(gen)
    backend.fail_on_decode = True
    with pytest.raises(RuntimeError, match="device lost"):
        next(gen)
    assert backend.slots == {}


def test_seeded_sampling_is_reproducible(tokenizer, table):
    params = dict(temperature=1.0, top_p=0.9, seed=1234, max_tokens=30, ignore_eos=True)
    prompt = tokenizer.encode("hello world")
    a = _run(BigramBackend(table), tokenizer, prompt, **params)
    b = _run(BigramBackend(table), tokenizer, prompt, **params)
    assert [c.token_id for c in a] == [c.token_id for c in b]
    assert [c.token_id for c in a] != _greedy_chain(table, prompt[-1], 30, set())


def test_logprobs_are_reported_when_asked(tokenizer, table):
    prompt = tokenizer.encode("hello")
    chunks = _run(BigramBackend(table), tokenizer, prompt, temperature=0, max_tokens=3,
                  logprobs=True)
    row = table[prompt[-1]].astype(np.float64)
    expected = row.max() - np.log(np.exp(row).sum())
    assert chunks[0].logprob == pytest.approx(expected, abs=1e-5)
    chunks = _run(BigramBackend(table), tokenizer, prompt, temperature=0, max_tokens=3)
    assert all(c.logprob is None for c in chunks)


def test_generate_text(tokenizer, table):
    prompt = "hello world"
    ids = tokenizer.encode(prompt)
    text, reason, usage = generate_text(
        BigramBackend(table), tokenizer, prompt, SamplingParams(temperature=0, max_tokens=8)
    )
    assert text == tokenizer.decode(_greedy_chain(table, ids[-1], 8, set()))
    assert (reason, usage.prompt_tokens, usage.completion_tokens) == ("length", len(ids), 8)
