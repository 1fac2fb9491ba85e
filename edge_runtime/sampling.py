"""Sampling: request parameters (their rules are edge_wire.sampling's) and a numpy sampler
(penalties, temperature, top-k, top-p) that picks the next token for a whole decode batch at once.

Each row costs a few passes over the vocabulary that run for all sampled rows together
(max, exp, sum, a threshold): tokens whose weight is under CANDIDATE_FLOOR of the best one
are set aside, and top-k, top-p and the draw itself work on the few candidates left. That is
exact, not an approximation: the candidates are the most likely tokens, so a top-k or top-p
set lies inside them whenever they hold k tokens or the top_p mass (else that row falls back
to the whole vocabulary), and a plain temperature draw lands outside them with exactly the
probability the set-aside tokens carry (it is then drawn among those)."""

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
_NUCLEUS_WINDOW = 64  # first guess at how many top tokens hold the top_p mass (fallback path)
_CDF_BLOCK = 256  # block size of the two-level inverse CDF
CANDIDATE_FLOOR = 1e-4  # tokens weighing less than this times the best token's are set aside first
_WIDE_FLOOR = 1e-9  # top-k's second net when fewer than k tokens pass CANDIDATE_FLOOR


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
    """One sequence's sampling state: its RNG (so a seed reproduces the sequence) and the
    token history the penalties need; every sampled token is recorded automatically."""

    def __init__(self, params: SamplingParams, vocab_size: int, prompt_ids: Iterable[int] = ()):
        self.params = params
        seed = None if params.seed is None else params.seed % 2**64  # numpy wants >= 0
        self.rng = np.random.default_rng(seed)
        self._output_counts: dict[int, int] = {}  # generated id -> count, in first-seen order
        prompt = np.unique(np.asarray(list(prompt_ids), dtype=np.int64))
        self._seen = set(prompt.tolist())
        self._seen_ids = prompt  # distinct prompt + output ids

    def record(self, token_id: int) -> None:
        """Count a generated token for the penalties."""
        self._output_counts[token_id] = self._output_counts.get(token_id, 0) + 1
        if token_id not in self._seen:
            self._seen.add(token_id)
            self._seen_ids = np.append(self._seen_ids, token_id)

    def has_penalties(self) -> bool:
        p = self.params
        return (p.repetition_penalty != 1.0 and self._seen_ids.size > 0) or (
            bool(p.presence_penalty or p.frequency_penalty) and bool(self._output_counts))

    def penalize_inplace(self, x: np.ndarray) -> None:
        """Repetition, then presence/frequency penalties, written into x [vocab] at the few
        ids seen (never a pass over the whole vocabulary)."""
        p = self.params
        if p.repetition_penalty != 1.0 and self._seen_ids.size:
            ids = self._seen_ids
            v = x[ids]
            x[ids] = np.where(v < 0, v * p.repetition_penalty, v / p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and self._output_counts:
            ids = np.fromiter(self._output_counts, np.int64, len(self._output_counts))
            counts = np.fromiter(self._output_counts.values(), np.float64, len(ids))
            x[ids] -= (p.frequency_penalty * counts + p.presence_penalty).astype(np.float32)

    def penalize(self, logits: np.ndarray) -> np.ndarray:
        """Logits after the penalties (a new array when any applies; the caller's is kept)."""
        if not self.has_penalties():
            return logits
        out = np.array(logits, dtype=np.float32)
        self.penalize_inplace(out)
        return out

    def sample(self, logits: np.ndarray, allowed: np.ndarray | None = None) -> tuple[int, float | None]:
        """Pick the next token from float32 logits [vocab] (left unchanged); see sample_batch."""
        return sample_batch([self], np.array(logits, dtype=np.float32)[None], [allowed])[0]


def sample_batch(samplers: list[Sampler], logits: np.ndarray, allowed: list[np.ndarray | None]) -> list[tuple[int, float | None]]:
    """The next token of every row of float32 logits [rows, vocab] (overwritten: penalties and
    masks are applied in place), row i by samplers[i]. allowed[i] (from a grammar: a bool mask
    [vocab], or the allowed token ids, ascending) restricts the pick after the penalties, so
    greedy and sampled picks both stay inside it. Returns (token_id, logprob) per row, the
    logprob being the model's (log-softmax of the raw logits) when params.logprobs is set."""
    logprob_of: dict[int, tuple[np.ndarray, float]] = {}
    for r, (sampler, mask) in enumerate(zip(samplers, allowed)):
        x = logits[r]
        if sampler.params.logprobs:  # the model's own distribution, before anything changes it
            m = float(x.max())
            logprob_of[r] = (x.copy(), m + float(np.log(np.exp(x - m).sum(dtype=np.float64))))
        sampler.penalize_inplace(x)
        if mask is not None and mask.dtype == np.bool_:
            x[~mask] = -np.inf
        elif mask is not None:
            kept = x[mask]
            x.fill(-np.inf)
            x[mask] = kept
    greedy = [r for r, s in enumerate(samplers) if s.params.temperature < _GREEDY_BELOW]
    drawn = [r for r, s in enumerate(samplers) if s.params.temperature >= _GREEDY_BELOW]
    tokens = dict(zip(greedy, np.argmax(logits[greedy], axis=1).tolist())) if greedy else {}
    if drawn:
        tokens.update(zip(drawn, _draw_rows(logits if len(drawn) == len(samplers) else logits[drawn], [samplers[r] for r in drawn])))
    out = []
    for r, sampler in enumerate(samplers):
        token = int(tokens[r])
        sampler.record(token)
        if r in logprob_of:
            raw, lse = logprob_of[r]
            out.append((token, float(raw[token]) - lse))
        else:
            out.append((token, None))
    return out


def _draw_rows(x: np.ndarray, samplers: list[Sampler]) -> list[int]:
    """Temperature, top-k and top-p draws for every row of x [rows, vocab] (overwritten with
    the weights). The passes over the vocabulary run in place, for all rows in one numpy call
    where broadcasting is not slower than a loop: fresh arrays of this size cost page faults."""
    np.multiply(x, np.array([1.0 / s.params.temperature for s in samplers], np.float32)[:, None], out=x)
    for row, best in zip(x, x.max(axis=1)):
        row -= best  # (x - max) / T <= 0: float32 exp (3x faster than float64) cannot overflow
    weights = np.exp(x, out=x)
    totals = weights.sum(axis=1)  # float32 pairwise summation: relative error ~1e-7
    floor = np.float32(CANDIDATE_FLOOR)
    return [_draw_row(weights[r], np.flatnonzero(weights[r] >= floor), float(totals[r]), s) for r, s in enumerate(samplers)]


def _draw_row(weights: np.ndarray, cand: np.ndarray, total: float, sampler: Sampler) -> int:
    """One row's draw: weights [vocab] (exp of the tempered logits), cand the ids of the
    tokens at or above CANDIDATE_FLOOR, total the sum of all weights."""
    p, u = sampler.params, sampler.rng.random()
    ids, w = cand, weights[cand].astype(np.float64)
    top_k = 0 < p.top_k < weights.shape[0]
    if top_k:
        if ids.shape[0] < p.top_k:  # too few candidates: a wider net (one pass, cheaper than a partition)
            ids = np.flatnonzero(weights >= np.float32(_WIDE_FLOOR))
            if ids.shape[0] < p.top_k:  # the k best of the whole vocabulary
                ids = np.argpartition(weights, -p.top_k)[-p.top_k :]
            w = weights[ids].astype(np.float64)
        if ids.shape[0] > p.top_k:  # (the k best above a floor are the k best of all)
            best = np.argpartition(w, -p.top_k)[-p.top_k :]
            ids, w = ids[best], w[best]
        total = float(w.sum())  # the k tokens are the whole distribution now
    elif p.top_p >= 1.0:  # the whole vocabulary: the rest is looked at only when u lands there
        held, r = float(w.sum()), u * total
        if r < held or total - held <= held * 1e-12:
            return int(ids[_first_above(np.cumsum(w), min(r, held))])
        rest = weights.copy()
        rest[cand] = 0
        return _inverse_cdf(rest, (r - held) / (total - held))
    if p.top_p < 1.0:
        order = np.argsort(-w, kind="stable")
        cum = np.cumsum(w[order])
        target = p.top_p * total
        if cum[-1] < target and not top_k:  # the nucleus reaches past the candidates: the exact slow path
            kept, kept_w = _nucleus(weights, p.top_p)
            return int(kept[_inverse_cdf(kept_w, u)])
        keep = min(int(np.searchsorted(cum, target, side="left")) + 1, len(order))
        ids, w = ids[order[:keep]], w[order[:keep]]
    return int(ids[_first_above(np.cumsum(w), u * float(w.sum()))])


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
