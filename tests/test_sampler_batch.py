"""The batched sampler against a reference that sorts the whole vocabulary in float64: the
same distribution (seeded draws, chi-square bound), rows independent of their batch, the
candidate prefilter's fallbacks exact, penalties exact."""

from __future__ import annotations

import numpy as np
import pytest

from edge_runtime.sampling import CANDIDATE_FLOOR, Sampler, SamplingParams, sample_batch

VOCAB = 49152  # the default model's vocabulary size


def reference_probs(logits: np.ndarray, temperature: float, top_k: int = 0, top_p: float = 1.0) -> np.ndarray:
    """Next-token probabilities the textbook way: temperature, top-k, then the smallest set of
    most likely tokens whose mass reaches top_p, renormalised."""
    x = logits.astype(np.float64) / temperature
    probs = np.exp(x - x.max())
    order = np.argsort(-probs, kind="stable")
    if top_k:
        probs[order[top_k:]] = 0
    probs /= probs.sum()
    if top_p < 1.0:
        cum = np.cumsum(probs[order])
        keep = int(np.searchsorted(cum, top_p, side="left")) + 1
        probs[order[keep:]] = 0
        probs /= probs.sum()
    return probs


def draw(params: SamplingParams, logits: np.ndarray, n: int, batch: int = 16) -> np.ndarray:
    """n draws, made `batch` rows at a time (rows of the same sampler state: no penalties)."""
    sampler = Sampler(params, logits.shape[0])
    out = []
    for _ in range(n // batch):
        picks = sample_batch([sampler] * batch, np.repeat(logits[None], batch, axis=0), [None] * batch)
        out += [t for t, _ in picks]
    return np.array(out)


def chi2_against(draws: np.ndarray, probs: np.ndarray, bins: int = 20) -> tuple[float, int]:
    """Chi-square of the draws against probs over the `bins` most likely tokens plus one bin
    for all the others (each bin expecting at least 5 draws); (statistic, degrees of freedom)."""
    n = len(draws)
    top = [t for t in np.argsort(-probs)[:bins] if probs[t] * n >= 5]
    expected = [probs[t] * n for t in top]
    observed = [int((draws == t).sum()) for t in top]
    rest = n - sum(expected)
    if rest >= 5:
        expected.append(rest)
        observed.append(n - sum(observed))
    e, o = np.array(expected), np.array(observed)
    return float(((o - e) ** 2 / e).sum()), len(e) - 1


def real_looking_logits(seed: int) -> np.ndarray:
    """A long-tailed distribution like a language model's: a few strong tokens, many weak."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(-4, 2, VOCAB).astype(np.float32)
    logits[rng.choice(VOCAB, 30, replace=False)] += rng.uniform(4, 10, 30).astype(np.float32)
    return logits


@pytest.mark.parametrize("params", [
    dict(temperature=0.7, top_p=0.9),
    dict(temperature=1.0),
    dict(temperature=1.3, top_k=40),
    dict(temperature=0.8, top_k=50, top_p=0.8),
])
def test_same_distribution_as_the_reference(params):
    logits = real_looking_logits(1)
    draws = draw(SamplingParams(seed=11, **params), logits, 4000)
    probs = reference_probs(logits, **params)
    assert probs[draws].min() > 0  # never outside the reference's support
    chi2, dof = chi2_against(draws, probs)
    assert chi2 < dof + 6 * np.sqrt(2 * dof)  # six standard deviations: fails by chance ~never


def test_plain_draw_reaches_tokens_below_the_candidate_floor_in_proportion():
    """One strong token and a long flat tail, every tail token under the floor but the tail
    holding a quarter of the mass: the tail must be drawn a quarter of the time."""
    logits = np.zeros(VOCAB, np.float32)
    logits[7] = np.log(3 * VOCAB)  # tail token weight 1 / (3 * VOCAB) of the top one: below the floor
    assert np.exp(-logits[7]) < CANDIDATE_FLOOR
    draws = draw(SamplingParams(seed=3), logits, 4000)
    tail = float((draws != 7).mean())
    assert abs(tail - 0.25) < 6 * np.sqrt(0.25 * 0.75 / len(draws))
    tail_draws = draws[draws != 7]
    assert len(set(tail_draws.tolist())) > 0.9 * len(tail_draws)  # spread over the tail, not one token of it


def test_top_p_past_the_candidates_falls_back_to_the_exact_nucleus():
    logits = np.random.default_rng(0).normal(0, 0.01, VOCAB).astype(np.float32)  # no ties to cut between
    logits[7] = np.log(3 * VOCAB)  # the top token holds 0.75: top_p 0.9 needs tail tokens too
    probs = reference_probs(logits, 1.0, top_p=0.9)
    draws = draw(SamplingParams(seed=4, top_p=0.9), logits, 2000)
    # float32 weights may move the cut by one token against the float64 reference, no more
    assert len(set(draws[probs[draws] == 0].tolist())) <= 1
    p_top = probs[7]
    assert abs(float((draws == 7).mean()) - p_top) < 6 * np.sqrt(p_top * (1 - p_top) / len(draws))


def test_top_k_wider_than_the_candidates_takes_the_k_best_of_the_vocabulary():
    logits = real_looking_logits(2)
    params = dict(temperature=0.5, top_k=200)  # at T 0.5 only a few dozen tokens clear the floor
    probs = reference_probs(logits, **params)
    draws = draw(SamplingParams(seed=5, **params), logits, 4000)
    assert probs[draws].min() > 0
    chi2, dof = chi2_against(draws, probs)
    assert chi2 < dof + 6 * np.sqrt(2 * dof)


def test_top_k_past_the_wide_net_takes_the_k_best_of_the_whole_vocabulary():
    """Fewer than k tokens clear even the second floor: the k best of all, the far tail included."""
    logits = np.full(VOCAB, -40.0, np.float32) - np.arange(VOCAB, dtype=np.float32) * 1e-3
    logits[[3, 11, 29]] = [0.0, -0.5, -1.0]
    params = dict(temperature=1.0, top_k=8)
    probs = reference_probs(logits, **params)
    draws = draw(SamplingParams(seed=6, **params), logits, 3000)
    assert probs[draws].min() > 0
    chi2, dof = chi2_against(draws, probs)
    assert chi2 < dof + 6 * np.sqrt(2 * dof)


def test_a_row_draws_the_same_alone_or_in_a_mixed_batch():
    """Each row uses its own RNG, parameters and penalties, whatever shares its batch."""
    kinds = [dict(temperature=0.0), dict(temperature=0.7, top_p=0.9), dict(temperature=1.2, top_k=5, repetition_penalty=1.3),
             dict(temperature=0.9, presence_penalty=1.0, frequency_penalty=0.5), dict(temperature=0.0, repetition_penalty=2.0)]
    steps = [real_looking_logits(10 + i) for i in range(12)]

    def run(batched: bool) -> list[list[int]]:
        samplers = [Sampler(SamplingParams(seed=i, **k), VOCAB, prompt_ids=[1, 2, 3]) for i, k in enumerate(kinds)]
        out: list[list[int]] = [[] for _ in kinds]
        for logits in steps:
            if batched:
                picks = sample_batch(samplers, np.repeat(logits[None], len(kinds), axis=0), [None] * len(kinds))
            else:
                picks = [s.sample(logits) for s in samplers]
            for row, (token, _) in zip(out, picks):
                row.append(token)
        return out

    assert run(batched=True) == run(batched=False)


def test_penalties_are_exact_inside_the_batch():
    """Greedy rows with penalties pick the argmax of exactly the penalised logits."""
    rng = np.random.default_rng(0)
    params = SamplingParams(temperature=0.0, repetition_penalty=1.5, presence_penalty=0.7, frequency_penalty=0.4)
    sampler = Sampler(params, 64, prompt_ids=[5, 6])
    history: list[int] = []
    for _ in range(30):
        logits = rng.normal(0, 1, 64).astype(np.float32)
        expected = logits.astype(np.float64)
        for t in set(history) | {5, 6}:
            expected[t] = expected[t] * 1.5 if expected[t] < 0 else expected[t] / 1.5
        for t in set(history):
            expected[t] -= 0.4 * history.count(t) + 0.7
        (token, _), = sample_batch([sampler], logits[None].copy(), [None])
        assert token == int(np.argmax(expected))
        history.append(token)
