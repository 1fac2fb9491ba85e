"""The sampler inside a grammar's mask: greedy and sampled picks, penalties included, stay among
the allowed tokens whether the grammar lists them by id or masks the whole vocabulary."""

from __future__ import annotations

import numpy as np
import pytest

from edge_runtime.sampling import Sampler, SamplingParams

VOCAB = 1000


@pytest.mark.parametrize("params", [
    dict(temperature=0.0),
    dict(temperature=1.0, seed=1),
    dict(temperature=0.8, seed=2, top_k=3, top_p=0.5, repetition_penalty=1.5, presence_penalty=1.0, frequency_penalty=1.0),
])
def test_picks_stay_inside_the_mask(params):
    rng = np.random.default_rng(0)
    allowed_ids = np.sort(rng.choice(VOCAB, 7, replace=False))
    mask = np.zeros(VOCAB, dtype=bool)
    mask[allowed_ids] = True
    by_ids, by_mask = Sampler(SamplingParams(**params), VOCAB), Sampler(SamplingParams(**params), VOCAB)
    for _ in range(200):
        logits = rng.standard_normal(VOCAB).astype(np.float32) * 5
        a, _ = by_ids.sample(logits, allowed_ids)
        b, _ = by_mask.sample(logits, mask)
        assert a in allowed_ids and b in allowed_ids
        assert a == b  # the same pick either way (same RNG draws, same order of candidates)


def test_greedy_takes_the_best_allowed_token_and_the_models_logprob():
    logits = np.arange(VOCAB, dtype=np.float32)
    sampler = Sampler(SamplingParams(temperature=0.0, logprobs=True), VOCAB)
    token, logprob = sampler.sample(logits, np.array([3, 10, 500]))
    assert token == 500
    assert logprob == pytest.approx(float(500 - 999 - np.log(np.exp(logits - 999).sum())), abs=1e-4)
