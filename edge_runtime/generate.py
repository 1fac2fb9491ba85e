"""The single-sequence generation loop: prefill a prompt into a backend slot, then sample and
decode one token at a time, streaming text that is final (whole UTF-8 characters, never
part of a stop string)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from edge_runtime.backends.base import Backend
from edge_runtime.errors import ContextLengthExceeded, InvalidRequest
from edge_runtime.grammar import Constraint, ConstraintError
from edge_runtime.sampling import Sampler, SamplingParams, sample_batch
from edge_runtime.tokenizer import IncrementalDecoder, Tokenizer
from edge_runtime.tools import ToolCallDelta, ToolCallParser

DEFAULT_PREFILL_CHUNK = 512
NO_TOKEN = -1  # token_id of a final chunk that carries no token (cancelled, deadline, error)


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class Timings:
    ttft_s: float  # start of generate() to the first token sampled
    total_s: float
    decode_tokens_per_s: float  # tokens after the first, over the time after the first
    queue_s: float = 0.0  # start of generate() to a KV slot (the scheduler's queue)


@dataclass
class GenerationChunk:
    token_id: int
    text: str  # content text made final by this token; may be ""
    logprob: float | None = None
    finish_reason: str | None = None  # None | "stop" | "length" | "tool_calls" (| the scheduler's own endings)
    usage: Usage | None = None  # set on the final chunk only
    timings: Timings | None = None  # set on the final chunk only
    tool_calls: list[ToolCallDelta] | None = None  # tool-call pieces made final by this token


class StopMatcher:
    """Filters streamed text for stop strings (OpenAI semantics: output ends just before the
    first stop string to complete; the stop string itself is not emitted). Holds back the
    longest tail that could still grow into a stop string."""

    def __init__(self, stops: Sequence[str]) -> None:
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        self._stops = list(stops)
        self._held = ""
        self.stopped = False

    def push(self, text: str) -> tuple[str, bool]:
        """Add a piece of text; return (text safe to emit now, whether a stop string hit)."""
        if self.stopped:
            return "", True
        buf = self._held + text
        # Only the newest piece can complete a stop string: earlier pushes found none.
        hit = min((i for i in (buf.find(s) for s in self._stops) if i >= 0), default=-1)
        if hit >= 0:
            self._held = ""
            self.stopped = True
            return buf[:hit], True
        keep = self._partial_suffix_len(buf)
        self._held = buf[len(buf) - keep :]
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        """The held-back text, once no more text will come (it cannot become a stop)."""
        held, self._held = self._held, ""
        return held

    def _partial_suffix_len(self, buf: str) -> int:
        """Length of the longest suffix of buf that is a proper prefix of some stop string."""
        best = 0
        for s in self._stops:
            j = buf.find(s[0], max(0, len(buf) - len(s) + 1))
            while j != -1:
                if s.startswith(buf[j:]):
                    best = max(best, len(buf) - j)
                    break  # the earliest match is this stop's longest suffix
                j = buf.find(s[0], j + 1)
        return best


class SequenceStream:
    """One sequence's output side: samples each next token from logits (inside the grammar's
    mask when it has one), detokenizes, applies stop tokens, stop strings, the grammar's end and
    the token budget, splits tool calls from content, and times it. Shared by the
    single-sequence loop below and the continuous-batching scheduler."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], params: SamplingParams, vocab_size: int,
                 max_context: int, constraint: Constraint | None = None, tool_parser: ToolCallParser | None = None) -> None:
        self.start = time.perf_counter()
        self.prompt_tokens = len(prompt_ids)
        self.sampler = Sampler(params, vocab_size, prompt_ids)
        self._decoder = IncrementalDecoder(tokenizer)
        self._matcher = StopMatcher(params.stop)
        self._constraint = constraint
        self._tools = tool_parser
        self._stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            self._stop_ids.update(tokenizer.eos_token_ids)
        # Prompt + completion must fit the context, so the last token sampled is never fed back.
        self._budget = min(params.max_tokens, max_context - len(prompt_ids))
        self.generated = 0
        self.ttft = 0.0
        self.queue_s = 0.0  # time in the scheduler's queue, set when it leaves it (the single-sequence loop never queues)
        self._call_log = _CallLog()

    def step(self, logits: np.ndarray) -> GenerationChunk:
        """Sample the next token from logits [vocab] (left unchanged); the chunk's
        finish_reason is set when this ends the sequence."""
        return step_batch([self], np.array(logits, dtype=np.float32)[None])[0]

    def allowed(self) -> np.ndarray | None:
        """The grammar's mask for the next token (None without one); raises ConstraintError."""
        return self._constraint.allowed() if self._constraint else None

    def advance(self, token: int, logprob: float | None) -> GenerationChunk:
        """Take the sampled token: detokenize, check the stops, the grammar and the budget."""
        self.generated += 1
        if self.generated == 1:
            self.ttft = time.perf_counter() - self.start
        if token in self._stop_ids:  # its text is not part of the output (the mask allows it only at the grammar's end)
            text, _ = self._drain()
            return self.final(token, text, logprob, "stop")
        if self._constraint:
            try:
                self._constraint.accept(token)
            except ConstraintError as exc:
                return self.final(token, f"grammar error: {exc}", logprob, "error")
        text, stopped = self._matcher.push(self._decoder.push(token))
        if stopped:
            return self.final(token, text, logprob, "stop")
        if self._constraint and self._constraint.complete:
            rest, _ = self._drain()
            return self.final(token, text + rest, logprob, "stop")
        if self.generated >= self._budget:
            rest, stopped = self._drain()
            return self.final(token, text + rest, logprob, "stop" if stopped else "length")
        if self._tools is None:
            return GenerationChunk(token, text, logprob)
        content, deltas = self._tools.push(text)
        if self._call_log.repeated(deltas, self._tools.calls):
            return self._ended(token, content, logprob, "tool_calls", deltas)
        return GenerationChunk(token, content, logprob, tool_calls=deltas or None)

    def dequeued(self) -> None:
        """The sequence left the scheduler's queue (got its KV slot, or ended while waiting)."""
        self.queue_s = time.perf_counter() - self.start

    def final(self, token: int, text: str, logprob: float | None, reason: str) -> GenerationChunk:
        deltas: list[ToolCallDelta] = []
        if self._tools is not None and reason in ("stop", "length"):
            text, deltas = self._tools.push(text)
            rest, more = self._tools.flush()
            text, deltas = text + rest, deltas + more
            if reason == "stop" and self._tools.calls:
                reason = "tool_calls"
        return self._ended(token, text, logprob, reason, deltas)

    def _ended(self, token: int, text: str, logprob: float | None, reason: str, deltas: list[ToolCallDelta]) -> GenerationChunk:
        total = time.perf_counter() - self.start
        n = self.generated
        rate = (n - 1) / (total - self.ttft) if n > 1 and total > self.ttft else 0.0
        timings = Timings(self.ttft, total, rate, self.queue_s)
        return GenerationChunk(token, text, logprob, reason, Usage(self.prompt_tokens, n), timings, deltas or None)

    def _drain(self) -> tuple[str, bool]:
        """Everything still held by the decoder and the stop matcher, at the end of output."""
        text, stopped = self._matcher.push(self._decoder.flush())
        return (text, True) if stopped else (text + self._matcher.flush(), False)


class _CallLog:
    """The tool calls of one answer as the parser finds them, to end the answer at the first exact
    repeat of an earlier call (same name, equal arguments): a small model asked for parallel calls
    otherwise tends to write the same call again until the limit (docs/tool-calling.md)."""

    def __init__(self) -> None:
        self._calls: list[list[str]] = []  # [name, arguments text] by index
        self._checked = 0  # calls complete and compared so far

    def repeated(self, deltas: list[ToolCallDelta], complete: int) -> bool:
        """Take the parser's deltas and its count of complete calls; whether the call just
        completed repeats an earlier one."""
        for delta in deltas:
            if delta.index == len(self._calls):
                self._calls.append([delta.name or "", ""])
            self._calls[delta.index][1] += delta.arguments
        while self._checked < min(complete, len(self._calls)):
            key = _call_key(self._calls[self._checked])
            if key is not None and any(_call_key(c) == key for c in self._calls[: self._checked]):
                return True
            self._checked += 1
        return False


def _call_key(call: list[str]) -> tuple[str, str] | None:
    try:
        return call[0], json.dumps(json.loads(call[1]), sort_keys=True)
    except ValueError:
        return None


def step_batch(streams: Sequence[SequenceStream], logits: np.ndarray) -> list[GenerationChunk]:
    """The next chunk of every stream, stream i sampling from row i of logits [n, vocab]
    (overwritten), all rows in one batched sampler call."""
    chunks: list[GenerationChunk | None] = [None] * len(streams)
    rows, allowed = [], []
    for i, stream in enumerate(streams):
        try:
            allowed.append(stream.allowed())
            rows.append(i)
        except ConstraintError as exc:
            chunks[i] = stream.final(NO_TOKEN, f"grammar error: {exc}", None, "error")
    if rows:
        picked = sample_batch([streams[i].sampler for i in rows], logits if len(rows) == len(streams) else logits[rows], allowed)
        for i, (token, logprob) in zip(rows, picked):
            chunks[i] = streams[i].advance(token, logprob)
    return chunks  # type: ignore[return-value]  # every entry is set above


def check_prompt(prompt_ids: list[int], vocab_size: int, max_context: int) -> None:
    """Reject a prompt before any work is done for it."""
    if not prompt_ids:
        raise InvalidRequest("prompt", "must contain at least one token")
    if min(prompt_ids) < 0 or max(prompt_ids) >= vocab_size:
        raise InvalidRequest("prompt", f"token ids must be in [0, {vocab_size})")
    if len(prompt_ids) >= max_context:
        raise ContextLengthExceeded(len(prompt_ids), max_context)


def generate(
    backend: Backend,
    tokenizer: Tokenizer,
    prompt_ids: list[int],
    params: SamplingParams,
    *,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
) -> Iterator[GenerationChunk]:
    """Stream the completion of prompt_ids. Bad input (empty prompt, ids outside the vocab,
    a prompt that leaves no room in the context) is raised here, before any slot is taken;
    the slot is taken on the first next() and always freed, also if the caller stops early."""
    check_prompt(prompt_ids, backend.vocab_size, backend.max_context)
    if prefill_chunk < 1:
        raise ValueError("prefill_chunk must be >= 1")
    return _run(backend, tokenizer, list(prompt_ids), params, prefill_chunk)


def _run(
    backend: Backend,
    tokenizer: Tokenizer,
    prompt_ids: list[int],
    params: SamplingParams,
    prefill_chunk: int,
) -> Iterator[GenerationChunk]:
    stream = SequenceStream(tokenizer, prompt_ids, params, backend.vocab_size, backend.max_context)
    slot = backend.allocate()
    try:
        logits = _prefill(backend, slot, prompt_ids, prefill_chunk)
        while True:
            chunk = stream.step(logits)
            yield chunk
            if chunk.finish_reason:
                return
            logits = backend.decode([slot], [chunk.token_id])[0]
    finally:
        backend.free(slot)


def _prefill(backend: Backend, slot: int, prompt_ids: list[int], chunk: int) -> np.ndarray:
    """Feed the prompt in pieces of at most `chunk` tokens (bounding activation memory);
    return the logits after the last one."""
    ids = np.asarray(prompt_ids, dtype=np.int64)
    for i in range(0, len(ids), chunk):
        logits = backend.prefill(slot, ids[i : i + chunk])
    return logits


def generate_text(
    backend: Backend, tokenizer: Tokenizer, prompt: str, params: SamplingParams
) -> tuple[str, str, Usage]:
    """Generate a whole completion of a text prompt: (text, finish_reason, usage)."""
    ids = tokenizer.encode(prompt, add_special_tokens=True)
    parts: list[str] = []
    for chunk in generate(backend, tokenizer, ids, params):
        parts.append(chunk.text)
    return "".join(parts), chunk.finish_reason, chunk.usage
