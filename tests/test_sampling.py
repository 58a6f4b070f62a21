"""The sampler: each backend's ``sample`` op against the numpy reference, and the
statistics and reproducibility every request relies on."""

from __future__ import annotations

import numpy as np
import pytest

from ferrum.backends import load_backend
from ferrum.errors import InvalidRequestError
from ferrum.sampling import RequestSampler, SamplingParams, build_sampling_batch, sample_batch, sample_numpy

from support import runnable_backends

BACKENDS = runnable_backends()
VOCAB = 50


@pytest.fixture(scope="module", params=BACKENDS)
def ops(request):
    return load_backend(request.param).ops


def well_separated_logits(rows: int, seed: int = 0) -> np.ndarray:
    """Logits whose probabilities are far apart, so float rounding cannot flip a pick."""
    rng = np.random.default_rng(seed)
    return np.stack([rng.permutation(VOCAB).astype(np.float32) * 0.37 for _ in range(rows)])


def sample_rows(ops, logits: np.ndarray, samplers) -> list:
    return sample_batch(ops, ops.from_numpy(logits, "float32"), samplers)


def test_native_sample_matches_the_reference(ops):
    params = [
        SamplingParams(),
        SamplingParams(temperature=0.8, seed=1),
        SamplingParams(temperature=1.3, top_k=5, seed=2, logprobs=3),
        SamplingParams(temperature=0.7, top_p=0.6, seed=3),
        SamplingParams(temperature=1.0, min_p=0.2, seed=4, logprobs=2),
        SamplingParams(temperature=0.9, repetition_penalty=1.5, presence_penalty=0.5, frequency_penalty=0.25,
                       logit_bias={7: 2.0, 11: -3.0}, seed=5),
        SamplingParams(logprobs=4, repetition_penalty=2.0),
        SamplingParams(temperature=4.0, top_k=6, top_p=0.45, seed=6),
    ]
    logits = well_separated_logits(len(params))
    for step in range(4):
        samplers = [RequestSampler(p, [3, 4, 40]) for p in params]
        for s in samplers:  # some history for the penalties
            for t in (4, 9, 9, step):
                s.record(t)
        batch = build_sampling_batch(samplers)
        got = ops.sample(ops.from_numpy(logits, "float32"), batch)
        want = sample_numpy(logits, batch)
        assert got.tokens.tolist() == want.tokens.tolist()
        np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-5)
        assert got.top_tokens.tolist() == want.top_tokens.tolist()
        np.testing.assert_allclose(got.top_logprobs, want.top_logprobs, atol=1e-5)


@pytest.mark.parametrize("top_p", [1.0, 0.95])
def test_seeded_picks_of_a_flat_large_vocabulary_follow_the_reference(ops, top_p):
    """Over Qwen's 151,936 tokens a flat distribution puts ~7e-6 on a token, so the cumulative sums must stay that
    close to float64's: MLX's CPU scan (and a top-k mass summed apart from it, which with no top-p cut the tail
    a cumulative sum ran past) moved over half the seeded picks; float32 leaves a few near a boundary."""
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((48, 151_936)) * 2.0).astype(np.float32)
    batch = build_sampling_batch([RequestSampler(SamplingParams(temperature=1.0, top_p=top_p, seed=i), [])
                                  for i in range(len(logits))])
    got = ops.sample(ops.from_numpy(logits, "float32"), batch).tokens
    assert (got != sample_numpy(logits, batch).tokens).sum() <= 4


def test_greedy_is_argmax(ops):
    logits = well_separated_logits(3, seed=4)
    picks = sample_rows(ops, logits, [RequestSampler(SamplingParams(), []) for _ in range(3)])
    assert [p.token for p in picks] == logits.argmax(axis=-1).tolist()
    assert all(p.logprob is None and p.top_logprobs == () for p in picks)


def many_draws(ops, params: SamplingParams, logits_row: np.ndarray, n: int = 3000) -> np.ndarray:
    """``n`` independent picks from one distribution, as one batch of ``n`` rows."""
    samplers = [RequestSampler(SamplingParams(**{**params.__dict__, "seed": i}), []) for i in range(n)]
    picks = sample_rows(ops, np.repeat(logits_row[None], n, axis=0), samplers)
    return np.array([p.token for p in picks])


def probabilities(logits_row: np.ndarray, temperature: float) -> np.ndarray:
    z = logits_row.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    return p / p.sum()


def test_top_k_never_yields_a_token_outside_the_top_k(ops):
    row = well_separated_logits(1, seed=7)[0] / 4
    tokens = many_draws(ops, SamplingParams(temperature=2.0, top_k=3), row)
    top3 = set(np.argsort(-row)[:3].tolist())
    assert set(tokens.tolist()) == top3  # all three show up, nothing else


def test_top_p_and_min_p_exclude_what_they_should(ops):
    row = np.log(np.array([0.5, 0.3, 0.15, 0.05] + [1e-6] * (VOCAB - 4), dtype=np.float32))
    top_p = set(many_draws(ops, SamplingParams(temperature=1.0, top_p=0.7), row, n=1000).tolist())
    assert top_p == {0, 1}  # 0.5 < 0.7 so token 1 is needed; 0.8 >= 0.7 so token 2 is not
    min_p = set(many_draws(ops, SamplingParams(temperature=1.0, min_p=0.25), row, n=1000).tolist())
    assert min_p == {0, 1, 2}  # 0.05 < 0.25 * 0.5


def test_top_p_is_measured_within_the_top_k(ops):
    """Both set: top-p of the top-k's renormalised mass (vLLM's, transformers' and llama.cpp's chain), so 0.40 of
    the top two's 0.75 is not half of it and token 1 stays out; top-p of the whole mass would keep it."""
    row = np.log(np.array([0.40, 0.35, 0.25] + [1e-9] * (VOCAB - 3), dtype=np.float32))
    both = set(many_draws(ops, SamplingParams(temperature=1.0, top_k=2, top_p=0.5), row, n=400).tolist())
    assert both == {0}
    wider = set(many_draws(ops, SamplingParams(temperature=1.0, top_k=2, top_p=0.6), row, n=400).tolist())
    assert wider == {0, 1}  # 0.40 / 0.75 < 0.6: token 1 is needed


def test_frequencies_follow_the_filtered_distribution(ops):
    row = np.array([2.0, 1.5, 1.0, 0.2, -1.0, -3.0] + [-9.0] * (VOCAB - 6), dtype=np.float32)
    n = 4000
    tokens = many_draws(ops, SamplingParams(temperature=0.7, top_k=4), row, n=n)
    expected = probabilities(row, 0.7)
    expected[np.argsort(-expected)[4:]] = 0.0
    expected /= expected.sum()
    observed = np.bincount(tokens, minlength=VOCAB) / n
    # 4 binomial standard deviations at most; the untempered distribution is far outside that
    assert np.abs(observed - expected).max() < 4 * np.sqrt(0.25 / n)
    untempered = probabilities(row, 1.0)
    assert np.abs(observed - untempered).max() > 0.05


def test_seeded_sampling_repeats_and_is_independent_of_the_batch(ops):
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=42)
    logits = well_separated_logits(6, seed=1) / 3

    def run(with_others: bool) -> list[int]:
        mine = RequestSampler(params, [])
        others = [RequestSampler(SamplingParams(temperature=0.5, seed=s), []) for s in range(4)]
        out = []
        for step in range(6):
            rows = [mine] + (others if with_others else [])
            batch_logits = np.repeat(logits[step : step + 1], len(rows), axis=0)
            out.append(sample_rows(ops, batch_logits, rows)[0].token)
        return out

    alone = run(False)
    assert alone == run(False) == run(True)
    other_seed = SamplingParams(temperature=1.0, top_p=0.9, seed=43)
    sampler = RequestSampler(other_seed, [])
    assert [sample_rows(ops, logits[s : s + 1], [sampler])[0].token for s in range(6)] != alone


def test_logit_bias_and_penalties(ops):
    row = np.array([[3.0, 1.0, -1.0, -2.0] + [-5.0] * (VOCAB - 4)], dtype=np.float32)

    def greedy(**kw) -> int:
        sampler = RequestSampler(SamplingParams(**kw), [0])
        return sample_rows(ops, row, [sampler])[0].token

    assert greedy() == 0
    assert greedy(logit_bias={9: 100.0}) == 9
    assert greedy(repetition_penalty=4.0) == 1  # prompt token 0: 3.0 / 4 < 1.0
    sampler = RequestSampler(SamplingParams(frequency_penalty=1.5), [])
    sampler.record(0)
    assert sample_rows(ops, row, [sampler])[0].token == 0  # 3.0 - 1.5 = 1.5 > 1.0
    sampler.record(0)
    assert sample_rows(ops, row, [sampler])[0].token == 1  # 3.0 - 3.0 < 1.0
    sampler = RequestSampler(SamplingParams(presence_penalty=2.5), [])
    sampler.record(0)
    sampler.record(0)
    assert sample_rows(ops, row, [sampler])[0].token == 1  # presence counts once: 0.5 < 1.0


def test_logprobs_are_of_the_adjusted_logits(ops):
    row = well_separated_logits(1, seed=9)
    sampler = RequestSampler(SamplingParams(logprobs=5, logit_bias={3: 1.0}), [])
    pick = sample_rows(ops, row, [sampler])[0]
    adjusted = row[0].astype(np.float64)
    adjusted[3] += 1.0
    logp = adjusted - np.log(np.exp(adjusted - adjusted.max()).sum()) - adjusted.max()
    assert pick.token == int(adjusted.argmax())
    assert pick.logprob == pytest.approx(logp[pick.token], abs=1e-5)
    assert [t for t, _ in pick.top_logprobs] == np.argsort(-logp)[:5].tolist()
    np.testing.assert_allclose([lp for _, lp in pick.top_logprobs], np.sort(logp)[::-1][:5], atol=1e-5)


@pytest.mark.parametrize("temperature", [0.002, 0.05, 1.0])
def test_top_logprobs_are_the_same_at_any_temperature(ops, temperature):
    """Logprobs come before temperature, and so does their ranking: at a low temperature the tail's probabilities
    underflow to ties, which must not reorder the top tokens (ranked by logit)."""
    rng = np.random.default_rng(3)
    row = (rng.permutation(VOCAB) * -0.6).astype(np.float32)[None]  # 0.6 nats apart: 20 ranks span 12 nats
    pick = sample_rows(ops, row, [RequestSampler(SamplingParams(temperature=temperature, logprobs=20, seed=1), [])])[0]
    assert [t for t, _ in pick.top_logprobs] == np.argsort(-row[0], kind="stable")[:20].tolist()
    values = [lp for _, lp in pick.top_logprobs]
    assert values == sorted(values, reverse=True)


def test_a_top_p_that_rounds_to_zero_keeps_the_most_likely_token(ops):
    row = well_separated_logits(1, seed=2)[0]
    draws = many_draws(ops, SamplingParams(temperature=1.0, top_p=1e-300), row, n=64)
    assert set(draws.tolist()) == {int(row.argmax())}


def test_a_top_k_past_the_vocabulary_keeps_every_token(ops):
    row = well_separated_logits(1, seed=5)[0]
    for huge in (VOCAB, 2**31, 2**63):
        np.testing.assert_array_equal(many_draws(ops, SamplingParams(temperature=1.0, top_k=huge), row, n=64),
                                      many_draws(ops, SamplingParams(temperature=1.0), row, n=64))


@pytest.mark.parametrize(
    "bad",
    [dict(temperature=-1.0), dict(top_k=-2), dict(top_p=0.0), dict(top_p=1.5), dict(min_p=2.0),
     dict(repetition_penalty=0.0), dict(repetition_penalty=1e-300), dict(repetition_penalty=1e300), dict(logprobs=-1),
     dict(max_tokens=0), dict(skip_special_tokens="no"), dict(ignore_eos=1),
     # past float32's range these became inf in the sampling batch, and every logprob NaN
     dict(logit_bias={5: 1e39}), dict(logit_bias={5: -2e4}), dict(presence_penalty=-1e39),
     dict(frequency_penalty=1e5), dict(stop={"a": 1}), dict(stop_token_ids={5: "x"}), dict(top_k=-1.0)],
)
def test_invalid_parameters_are_refused(bad):
    with pytest.raises(InvalidRequestError):
        SamplingParams(**bad)


@pytest.mark.parametrize("field, bad", [("stop_token_ids", [5, -3]), ("logit_bias", {-1: 1.0}),
                                        ("logit_bias", {5: float("nan")})])
def test_a_bad_entry_of_a_collection_names_its_field(field, bad):
    """The error's param is the request field (a client's 400 points at it), not the entry's description."""
    with pytest.raises(InvalidRequestError) as caught:
        SamplingParams(**{field: bad})
    assert caught.value.param == field


def test_collections_given_as_iterators_are_kept():
    """A generator of stop strings was used up by the check and stored empty: generation never stopped."""
    params = SamplingParams(stop=(s for s in ["\n", "."]), stop_token_ids=iter([5, np.int64(6)]))
    assert params.stop == ("\n", ".") and params.stop_token_ids == (5, 6)
    assert SamplingParams(stop_token_ids=np.int64(7)).stop_token_ids == (7,)


def test_a_bias_at_the_bound_forces_its_token_without_nan(ops):
    """1e4 (the most a bias may be) already decides the token, and keeps every logprob finite."""
    row = well_separated_logits(1, seed=4)[0]
    low = int(row.argmin())
    pick = sample_rows(ops, row[None], [RequestSampler(SamplingParams(logit_bias={low: 1e4}, logprobs=3), [])])[0]
    assert pick.token == low and np.isfinite(pick.logprob) and all(np.isfinite(v) for _, v in pick.top_logprobs)


def test_vllms_spellings_of_none_are_taken():
    """``top_k=-1`` is off and None is none, as vLLM's SamplingParams spell them; ``max_tokens=None`` runs to the
    context length (the engine stops a request there)."""
    params = SamplingParams(max_tokens=None, top_k=-1, stop=None, stop_token_ids=None, logit_bias=None,
                            logprobs=None)
    assert (params.top_k, params.stop, params.stop_token_ids, params.logit_bias, params.logprobs) == (0, (), (), {}, 0)
    assert params.max_tokens >= 2**31 - 1


def test_logit_bias_applies_before_the_repetition_penalty_as_mlx_lm_orders_them(ops):
    """The penalty scales the biased logit (vLLM's, mlx-lm's and llama.cpp's order): every logprob equals the
    log-softmax of mlx-lm's own logits processors' output, on tokens biased, penalised, or both."""
    mx = pytest.importorskip("mlx.core")
    sample_utils = pytest.importorskip("mlx_lm.sample_utils")
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((1, VOCAB)) * 3).astype(np.float32)
    bias, prompt = {4: 2.0, 9: -3.0, 11: 1.0, 3: 5.0}, [3, 4, 9, 20]
    reference = mx.array(logits)
    for processor in sample_utils.make_logits_processors(logit_bias=bias, repetition_penalty=1.7):
        reference = processor(mx.array(prompt), reference)
    expected = np.array(reference, dtype=np.float64)
    expected = expected - expected.max() - np.log(np.exp(expected - expected.max()).sum())
    sampler = RequestSampler(SamplingParams(logit_bias=bias, repetition_penalty=1.7, logprobs=VOCAB), prompt)
    got = ops.sample(ops.from_numpy(logits, "float32"), build_sampling_batch([sampler]))
    by_token = np.empty(VOCAB)
    by_token[got.top_tokens[0]] = got.top_logprobs[0]
    np.testing.assert_allclose(by_token, expected[0], atol=1e-4)
