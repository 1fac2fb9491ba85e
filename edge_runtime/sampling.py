"""Per-sequence sampling: request parameters (their rules are edge_wire.sampling's) and a numpy
sampler (penalties, temperature, top-k, top-p) fast enough for a ~50k vocabulary."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import msgspec
import numpy as np

from edge_runtime.errors import InvalidRequest
from edge_wire import sampling as wire
from edge_wire.validation import explain

# Temperatures this small are greedy: dividing float32 logits by them would overflow.
_GREEDY_BELOW = 1e-5
_NUCLEUS_WINDOW = 64  # first guess at how many top tokens hold the top_p mass
_CDF_BLOCK = 256  # block size of the two-level inverse CDF


class SamplingParams(wire.SamplingParams):
    """The protocol's sampling parameters, checked when built by hand (CLI, tests) as well as
    when decoded from a frame."""

    def __post_init__(self) -> None:  # the protocol's own checks run inside _check
        if isinstance(self.stop, str):  # one string is the wire's shorthand; in code, stop is a list
            raise InvalidRequest("stop", "must be a list of strings")
        checked = _check(msgspec.structs.asdict(self))
        for name in self.__struct_fields__:  # numbers come back as their declared type
            setattr(self, name, getattr(checked, name))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SamplingParams:
        """Build from a request body: unknown keys are rejected, None means "use the default",
        and `stop` may be a single string (as the OpenAI API allows)."""
        if not isinstance(d, Mapping):
            raise InvalidRequest("params", "must be an object")
        return cls(**msgspec.structs.asdict(_check({k: v for k, v in d.items() if v is not None})))  # stop: a list now


def _check(values: dict[str, Any]) -> wire.SamplingParams:
    try:
        return msgspec.convert(values, wire.SamplingParams)
    except msgspec.ValidationError as exc:
        problem = explain(exc, wire.SamplingParams, values)
        raise InvalidRequest(problem.path or "params", problem.phrase) from None


class Sampler:
    """Samples one sequence's tokens. Owns its RNG (so a seed reproduces the sequence) and
    the token history the penalties need; every sampled token is recorded automatically."""

    def __init__(self, params: SamplingParams, vocab_size: int, prompt_ids: Iterable[int] = ()):
        self.params = params
        seed = None if params.seed is None else params.seed % 2**64  # numpy wants >= 0
        self._rng = np.random.default_rng(seed)
        self._output_counts = np.zeros(vocab_size, dtype=np.int64)
        self._output_ids: list[int] = []  # distinct generated ids, in first-seen order
        self._seen = np.zeros(vocab_size, dtype=bool)
        prompt = np.asarray(list(prompt_ids), dtype=np.int64)
        self._seen[prompt] = True
        self._seen_ids = np.flatnonzero(self._seen)  # distinct prompt + output ids

    def record(self, token_id: int) -> None:
        """Count a generated token for the penalties."""
        if self._output_counts[token_id] == 0:
            self._output_ids.append(token_id)
        self._output_counts[token_id] += 1
        if not self._seen[token_id]:
            self._seen[token_id] = True
            self._seen_ids = np.append(self._seen_ids, token_id)

    def penalize(self, logits: np.ndarray) -> np.ndarray:
        """Logits after repetition, then presence/frequency penalties (a new array when any
        penalty applies; the caller's array is never modified)."""
        p = self.params
        out = logits
        if p.repetition_penalty != 1.0 and self._seen_ids.size:
            out = np.array(logits, dtype=np.float32)
            ids = self._seen_ids
            x = out[ids]
            out[ids] = np.where(x < 0, x * p.repetition_penalty, x / p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and self._output_ids:
            if out is logits:
                out = np.array(logits, dtype=np.float32)
            ids = np.asarray(self._output_ids)
            counts = self._output_counts[ids]
            out[ids] -= (p.frequency_penalty * counts + p.presence_penalty).astype(np.float32)
        return out

    def sample(self, logits: np.ndarray, allowed: np.ndarray | None = None) -> tuple[int, float | None]:
        """Pick the next token from float32 logits [vocab]. `allowed` (from a grammar: a bool mask
        [vocab], or the allowed token ids, ascending) restricts the pick after the penalties, so
        greedy and sampled picks both stay inside it. Returns (token_id, logprob), the logprob
        being the model's (log-softmax of the raw logits) when params.logprobs is set, else None."""
        x = self.penalize(logits)
        ids = None
        if allowed is not None and allowed.dtype == np.bool_:
            x = np.where(allowed, x, np.float32(-np.inf))
        elif allowed is not None:  # a few ids: choose among them alone
            ids, x = allowed, x[allowed]
        i = int(np.argmax(x)) if self.params.temperature < _GREEDY_BELOW else self._draw(x)
        token = i if ids is None else int(ids[i])
        self.record(token)
        logprob = _logprob(logits, token) if self.params.logprobs else None
        return token, logprob

    def _draw(self, x: np.ndarray) -> int:
        p = self.params
        ids, cand = _top_k(x, p.top_k)
        # float32 exp is 3x faster than float64; (cand - max) <= 0 so nothing overflows.
        weights = np.exp((cand.astype(np.float32) - cand.max()) / np.float32(p.temperature))
        if p.top_p < 1.0:
            kept, weights = _nucleus(weights, p.top_p)
            ids = kept if ids is None else ids[kept]
        i = _inverse_cdf(weights, self._rng.random())
        return i if ids is None else int(ids[i])


def _top_k(x: np.ndarray, k: int) -> tuple[np.ndarray | None, np.ndarray]:
    """(ids, logits) of the k largest logits, unordered; ids is None when nothing is cut."""
    if k == 0 or k >= x.shape[0]:
        return None, x
    ids = np.argpartition(x, -k)[-k:]
    return ids, x[ids]


def _nucleus(weights: np.ndarray, top_p: float) -> tuple[np.ndarray, np.ndarray]:
    """(indices into weights, their weights) of the smallest set of most likely tokens whose
    mass reaches top_p, most likely first; never empty. Sorts only a growing window of the
    top tokens, since the nucleus is usually far smaller than the vocabulary."""
    target = top_p * weights.sum(dtype=np.float64)
    n = weights.shape[0]
    window = _NUCLEUS_WINDOW
    while True:
        if window >= n:
            top = np.argsort(-weights)
        else:
            top = np.argpartition(weights, -window)[-window:]
            top = top[np.argsort(-weights[top])]
        cum = np.cumsum(weights[top], dtype=np.float64)
        if cum[-1] >= target or window >= n:
            keep = min(int(np.searchsorted(cum, target, side="left")) + 1, len(top))
            return top[:keep], weights[top[:keep]]
        window *= 8


def _inverse_cdf(weights: np.ndarray, u: float) -> int:
    """The index u (uniform in [0, 1)) selects in proportion to weights. Two levels (block
    sums, then one block's cumsum) because a full-vocabulary cumsum is slow in numpy."""
    starts = np.arange(0, weights.shape[0], _CDF_BLOCK)
    block_cdf = np.cumsum(np.add.reduceat(weights, starts, dtype=np.float64))
    b = _first_above(block_cdf, u * block_cdf[-1])
    target = u * block_cdf[-1] - (block_cdf[b - 1] if b else 0.0)
    block = weights[starts[b] : starts[b] + _CDF_BLOCK]
    return int(starts[b]) + _first_above(np.cumsum(block, dtype=np.float64), target)


def _first_above(cdf: np.ndarray, target: float) -> int:
    """First index whose cumulative weight exceeds target, so never a zero-weight entry.
    Rounding can put target at the total; then the last entry with weight."""
    i = int(np.searchsorted(cdf, target, side="right"))
    return i if i < cdf.shape[0] else int(np.searchsorted(cdf, cdf[-1], side="left"))


def _logprob(logits: np.ndarray, token: int) -> float:
    x = logits.astype(np.float32)
    m = x.max()
    return float(x[token] - m) - float(np.log(np.exp(x - m).sum(dtype=np.float64)))
