import numpy as np
import pytest
import torch
from transformers import RepetitionPenaltyLogitsProcessor

from edge_runtime.errors import InvalidRequest
from edge_runtime.sampling import Sampler, SamplingParams

VOCAB = 1000


def _logits(seed: int, vocab: int = VOCAB) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 3, vocab).astype(np.float32)


def _draws(params: SamplingParams, logits: np.ndarray, n: int) -> np.ndarray:
    sampler = Sampler(params, logits.shape[0])
    return np.array([sampler.sample(logits)[0] for _ in range(n)])


def test_greedy_is_argmax():
    sampler = Sampler(SamplingParams(temperature=0), VOCAB)
    for seed in range(20):
        logits = _logits(seed)
        assert sampler.sample(logits) == (int(np.argmax(logits)), None)


def test_same_seed_same_tokens():
    def run(seed: int) -> list[int]:
        sampler = Sampler(SamplingParams(seed=seed, temperature=1.3, top_p=0.95), VOCAB)
        return [sampler.sample(_logits(i))[0] for i in range(50)]

    assert run(7) == run(7)
    assert run(7) != run(8)
    assert run(-1) == run(2**64 - 1)  # a negative seed is its unsigned 64-bit twin


def test_top_k_1_and_tiny_top_p_are_greedy():
    for seed in range(10):
        logits = _logits(seed)
        best = int(np.argmax(logits))
        assert set(_draws(SamplingParams(top_k=1, seed=seed), logits, 20)) == {best}
        assert set(_draws(SamplingParams(top_p=1e-9, seed=seed), logits, 20)) == {best}


def test_top_k_keeps_only_k_best():
    logits = _logits(3)
    top3 = set(np.argsort(-logits)[:3].tolist())
    draws = _draws(SamplingParams(top_k=3, temperature=2.0, seed=0), logits, 300)
    assert set(draws.tolist()) == top3


@pytest.mark.parametrize("top_p, support", [(0.75, {0, 1}), (0.85, {0, 1, 2})])
def test_top_p_keeps_smallest_set_reaching_p(top_p, support):
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], dtype=np.float32))
    draws = _draws(SamplingParams(top_p=top_p, seed=1), logits, 2000)
    assert set(draws.tolist()) == support


def test_top_p_on_large_vocab_matches_full_sort():
    # A flat distribution puts hundreds of tokens in the nucleus, past the first window.
    logits = np.random.default_rng(0).normal(0, 0.5, 49152).astype(np.float32)
    probs = np.exp(logits.astype(np.float64) - logits.max())
    order = np.argsort(-probs)
    cum = np.cumsum(probs[order]) / probs.sum()
    nucleus = set(order[: np.searchsorted(cum, 0.3) + 1].tolist())
    assert len(nucleus) > 1000
    draws = _draws(SamplingParams(top_p=0.3, seed=2), logits, 1000)
    assert set(draws.tolist()) <= nucleus
    assert len(set(draws.tolist())) > 300


@pytest.mark.parametrize("temperature", [0.5, 1.0, 1.7])
def test_temperature_matches_softmax_distribution(temperature):
    logits = np.array([2.0, 1.0, 0.5, 0.0, -1.0, -3.0], dtype=np.float32)
    n = 20000
    draws = _draws(SamplingParams(temperature=temperature, seed=123), logits, n)
    expected = np.exp(logits / temperature)
    expected = n * expected / expected.sum()
    observed = np.bincount(draws, minlength=len(logits))
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert chi2 < 40  # 5 degrees of freedom: P(chi2 > 40) ~ 1e-7


def test_sampling_across_blocks_never_picks_masked_tokens():
    # Mass spread over several 256-token blocks of the two-level inverse CDF, the rest -inf.
    logits = np.full(1000, -np.inf, dtype=np.float32)
    live = np.array([0, 255, 256, 511, 700, 999])
    logits[live] = [0.5, -0.2, 1.0, 0.0, -1.0, 0.3]
    n = 20000
    draws = _draws(SamplingParams(seed=9), logits, n)
    assert set(draws.tolist()) <= set(live.tolist())
    expected = np.exp(logits[live]) / np.exp(logits[live]).sum() * n
    observed = np.bincount(draws, minlength=1000)[live]
    assert float(((observed - expected) ** 2 / expected).sum()) < 40


def test_repetition_penalty_matches_transformers():
    prompt, output = [3, 5, 5, 17], [17, 42, 99, 3]
    logits = _logits(11, 128)
    sampler = Sampler(SamplingParams(repetition_penalty=1.3), 128, prompt)
    for t in output:
        sampler.record(t)
    ours = sampler.penalize(logits)

    hf = RepetitionPenaltyLogitsProcessor(1.3)(
        torch.tensor([prompt + output]), torch.from_numpy(logits.copy())[None]
    )[0].numpy()
    np.testing.assert_allclose(ours, hf, rtol=1e-6)
    assert not np.array_equal(ours, logits)


def test_presence_and_frequency_penalties_follow_openai_formula():
    logits = _logits(5, 64)
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    sampler = Sampler(params, 64, prompt_ids=[1, 2, 3])  # the prompt is not penalised
    for t in [7, 7, 7, 9, 2]:
        sampler.record(t)
    expected = logits.copy()
    for token, count in {7: 3, 9: 1, 2: 1}.items():
        expected[token] -= count * 0.25 + 0.5
    np.testing.assert_allclose(sampler.penalize(logits), expected, rtol=1e-6)


def test_penalties_leave_caller_logits_alone():
    logits = _logits(2, 64)
    before = logits.copy()
    params = SamplingParams(repetition_penalty=2.0, presence_penalty=1.0, seed=0)
    sampler = Sampler(params, 64, prompt_ids=range(64))
    for _ in range(5):
        sampler.sample(logits)
    np.testing.assert_array_equal(logits, before)


def test_logprob_is_model_log_softmax():
    logits = _logits(4)
    token, logprob = Sampler(SamplingParams(logprobs=True, seed=0), VOCAB).sample(logits)
    log_softmax = torch.log_softmax(torch.from_numpy(logits).double(), -1)
    assert logprob == pytest.approx(float(log_softmax[token]), abs=1e-5)


@pytest.mark.parametrize(
    "param, value",
    [
        ("max_tokens", 0),
        ("max_tokens", 1.5),
        ("max_tokens", True),
        ("temperature", -0.1),
        ("temperature", 2.01),
        ("temperature", float("nan")),
        ("temperature", "1"),
        ("top_p", 0.0),
        ("top_p", 1.1),
        ("top_k", -1),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", float("inf")),
        ("presence_penalty", 2.5),
        ("frequency_penalty", -2.5),
        ("seed", 2**64),
        ("seed", 1.0),
        ("stop", "x"),
        ("stop", [""]),
        ("stop", ["x" * 257]),
        ("stop", ["s"] * 17),
        ("stop_token_ids", [-1]),
        ("stop_token_ids", ["2"]),
        ("ignore_eos", 1),
        ("logprobs", "yes"),
    ],
)
def test_validation_names_the_param(param, value):
    with pytest.raises(InvalidRequest) as err:
        SamplingParams(**{param: value})
    assert err.value.param == param
    assert str(err.value).startswith(f"{param}: ")


def test_from_dict():
    p = SamplingParams.from_dict({"temperature": 0, "stop": "\n", "seed": None, "top_k": 5})
    assert (p.temperature, p.stop, p.seed, p.top_k) == (0.0, ["\n"], None, 5)
    assert isinstance(p.temperature, float)
    with pytest.raises(InvalidRequest) as err:
        SamplingParams.from_dict({"temprature": 0.5})
    assert err.value.param == "temprature"
