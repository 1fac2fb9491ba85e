"""Constrained decoding: the `grammar` of a generate request, compiled with llguidance into a
per-sequence matcher that says which tokens may come next. Compiled grammars are cached by a
hash of their text; the tokenizer view llguidance needs is built once per model, on first use.

llguidance was measured against xgrammar and outlines-core on the default model's vocabulary
(bench/results/grammar_libs-smollm2-135m.md): on small schemas all three mask a token in
microseconds; on 40 objects of strings and numbers xgrammar took 9x as long per token and
outlines-core 2 s to compile. llguidance also has no dependencies (xgrammar needs torch), takes
Lark grammars with embedded JSON schemas (tool calls after free text), and names the schema
features it does not support."""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import llguidance
import numpy as np

from .errors import InvalidRequest
from .tokenizer import Tokenizer

GRAMMAR_TYPES = ("json_object", "json_schema", "tool_calls")
TOOL_MODES = ("auto", "required")
# The layout small models saw most in training: `{"a": 1, "b": [2, 3]}` on one line.
JSON_STYLE: dict[str, Any] = {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}
CACHE_ENTRIES = 64
# Up to this many 32-token words of the mask with a bit set, the allowed tokens are listed by id and
# sampled among directly; masking all ~50k logits costs as much as computing the mask.
FEW_WORDS = 64
_EXCERPT_LINE = re.compile(r"\s*\d+ \|").match  # llguidance quotes the grammar after its message
_LOCATION = re.compile(r"^at \d+\(\d+\): ")


@dataclass(frozen=True)
class GrammarSpec:
    """A validated `grammar` field: what the output must be."""

    type: str  # one of GRAMMAR_TYPES
    schema: Mapping[str, Any] | None = None  # json_schema
    mode: str = "required"  # tool_calls: "auto" (text or calls) or "required"
    names: tuple[str, ...] = ()  # tool_calls: the tools that may be called; () = all
    parallel: bool = True  # tool_calls: more than one call per answer


def parse_grammar(value: Any) -> GrammarSpec:
    """Validate the `grammar` field of a generate frame; raises InvalidRequest naming the key."""
    if not isinstance(value, Mapping):
        raise InvalidRequest("grammar", "must be a map")
    kind = value.get("type")
    if kind not in GRAMMAR_TYPES:
        raise InvalidRequest("grammar.type", f"must be one of {', '.join(GRAMMAR_TYPES)}, got {kind!r}")
    allowed = {"json_object": {"type"}, "json_schema": {"type", "schema"}, "tool_calls": {"type", "mode", "names", "parallel"}}
    for key in value:
        if key not in allowed[kind]:
            raise InvalidRequest(f"grammar.{key}", f"unknown field for grammar type {kind!r}")
    if kind == "json_schema":
        schema = value.get("schema")
        if not isinstance(schema, Mapping):
            raise InvalidRequest("grammar.schema", "must be a map (a JSON schema)")
        return GrammarSpec(kind, schema=schema)
    if kind == "tool_calls":
        mode = value.get("mode", "required")
        if mode not in TOOL_MODES:
            raise InvalidRequest("grammar.mode", f"must be 'auto' or 'required', got {mode!r}")
        names = value.get("names", [])
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise InvalidRequest("grammar.names", "must be a list of tool names")
        parallel = value.get("parallel", True)
        if not isinstance(parallel, bool):
            raise InvalidRequest("grammar.parallel", "must be a boolean")
        return GrammarSpec(kind, mode=mode, names=tuple(names), parallel=parallel)
    return GrammarSpec(kind)


def json_grammar(schema: Mapping[str, Any], param: str) -> str:
    """The llguidance grammar of JSON text following `schema`, in JSON_STYLE."""
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(dict(schema), overrides=JSON_STYLE)
    except (TypeError, ValueError) as exc:  # not JSON: binary strings, non-string keys
        raise InvalidRequest(param, f"not a JSON schema ({exc})") from None


def lark_json(schema: Mapping[str, Any]) -> str:
    """`schema` (already checked by json_grammar) as a Lark fragment (`%json {...}`) for grammars
    that embed JSON values."""
    extra = schema.get("x-guidance")
    styled = {**schema, "x-guidance": {**(extra if isinstance(extra, Mapping) else {}), **JSON_STYLE}}
    return "%json " + json.dumps(styled, ensure_ascii=False)


class ConstraintError(Exception):
    """The grammar cannot go on (a token outside the mask, or a dead end); ends the sequence."""


class Constraint:
    """One sequence's grammar state: the tokens allowed next, advanced by every accepted token.
    The mask depends only on the tokens generated, never on the prompt, so prefix-cache hits
    and batch neighbours do not change it."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int) -> None:
        self._matcher = matcher
        self._vocab = vocab_size
        self._bits = np.zeros((vocab_size + 31) // 32, dtype=np.int32)

    def allowed(self) -> np.ndarray:
        """The tokens the grammar accepts next (end-of-text only when it is complete): their ids,
        ascending, when they are few (most steps inside JSON), else a bool mask [vocab]."""
        self._matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        if self._matcher.is_error():
            raise ConstraintError(self._matcher.get_error())
        words = np.flatnonzero(self._bits)
        if len(words) <= FEW_WORDS:
            bits = np.unpackbits(self._bits[words].view(np.uint8), bitorder="little").reshape(len(words), 32)
            row, col = np.nonzero(bits)
            return words[row] * 32 + col
        return np.unpackbits(self._bits.view(np.uint8), bitorder="little")[: self._vocab].view(bool)

    def accept(self, token_id: int) -> None:
        if not self._matcher.consume_token(token_id):
            raise ConstraintError(self._matcher.get_error() or f"token {token_id} is not allowed here")

    @property
    def complete(self) -> bool:
        """Nothing but end-of-text can follow: the output is whole, end the sequence now."""
        return self._matcher.is_stopped()


class GrammarCompiler:
    """Compiles grammar text for one model, caching the result (or the error) by its hash.
    Thread-safe: requests are prepared on worker threads."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, cache_entries: int = CACHE_ENTRIES) -> None:
        self._tokenizer = tokenizer
        self._vocab = vocab_size
        self._entries = cache_entries
        self._lock = threading.Lock()
        self._lltok: llguidance.LLTokenizer | None = None
        self._cache: OrderedDict[str, llguidance.LLMatcher | str] = OrderedDict()

    def constraint(self, grammar: str, param: str) -> Constraint:
        """A fresh matcher for `grammar`; an invalid or unsupported grammar raises InvalidRequest
        naming `param` and the feature at fault."""
        compiled = self._compiled(grammar)
        if isinstance(compiled, str):
            raise InvalidRequest(param, compiled)
        return Constraint(compiled.deep_copy(), self._vocab)

    def check(self, grammar: str, param: str) -> None:
        """Raise InvalidRequest if `grammar` does not compile (the result is cached either way)."""
        compiled = self._compiled(grammar)
        if isinstance(compiled, str):
            raise InvalidRequest(param, compiled)

    def warm(self) -> None:
        """Build the tokenizer view now (at start), not on the first constrained request."""
        self._lltokenizer()

    def _compiled(self, grammar: str) -> llguidance.LLMatcher | str:
        key = hashlib.sha256(grammar.encode("utf-8", "surrogatepass")).hexdigest()
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        matcher = llguidance.LLMatcher(self._lltokenizer(), grammar, log_level=0)  # drops the GIL while it compiles
        result: llguidance.LLMatcher | str = _error_message(matcher.get_error()) if matcher.is_error() else matcher
        with self._lock:
            self._cache[key] = result
            while len(self._cache) > self._entries:
                self._cache.popitem(last=False)
        return result

    def _lltokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:  # built once (~0.2 s for a 49k vocabulary)
            if self._lltok is None:
                self._lltok = llguidance.LLTokenizer(
                    self._tokenizer.to_json(), n_vocab=self._vocab, eos_token=list(self._tokenizer.eos_token_ids)
                )
            return self._lltok


def _error_message(error: str) -> str:
    """llguidance's error as one line, without its grammar excerpt and location: 'at 2(8): failed
    to compile JSON schema: Unimplemented keys: ["uniqueItems"]' -> 'unsupported JSON schema:
    Unimplemented keys: ["uniqueItems"]'."""
    lines = []
    for line in error.strip().splitlines():
        if _EXCERPT_LINE(line):
            break
        lines.append(line.strip())
    detail = _LOCATION.sub("", " ".join(part for part in lines if part)).replace("failed to compile JSON schema: ", "")
    return f"unsupported JSON schema: {detail or 'invalid grammar'}"
