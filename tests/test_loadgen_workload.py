"""The load generator's schedule is statistically what the workload says (no server needed)."""

from __future__ import annotations

import math
import random
from collections import Counter
from itertools import pairwise

import pytest
from scipy import stats

from clients.loadgen.workload import (
    MAX_ADAPTERS,
    ArrivalSpec,
    LengthSpec,
    PopularitySpec,
    WorkloadSpec,
    generate_schedule,
)

NAMES = tuple(f"a{i}" for i in range(20))


def _spec(
    arrival: ArrivalSpec, popularity: PopularitySpec | None = None, n: int = 20_000, **kw
) -> WorkloadSpec:
    return WorkloadSpec(arrival, popularity or PopularitySpec(NAMES), num_requests=n, duration_s=3600.0, **kw)


def _gaps(spec: WorkloadSpec) -> list[float]:
    times = [0.0] + [p.at for p in generate_schedule(spec)]
    return [b - a for a, b in pairwise(times)]


def test_poisson_interarrivals_are_exponential():
    rate = 7.5
    gaps = _gaps(_spec(ArrivalSpec(rate)))
    assert len(gaps) == 20_000
    ks = stats.kstest(gaps, "expon", args=(0, 1 / rate))
    assert ks.pvalue > 0.01, ks
    assert abs(sum(gaps) / len(gaps) - 1 / rate) < 0.03 / rate


@pytest.mark.parametrize("cv", [0.5, 2.0, 4.0])
def test_gamma_interarrivals_have_the_rate_and_cv(cv):
    rate = 3.0
    gaps = _gaps(_spec(ArrivalSpec(rate, "gamma", cv), seed=1))
    shape = 1 / cv**2
    if cv <= 2.0:
        # At cv=4 (shape 1/16) ~10% of the gaps are below the float resolution of the arrival times and
        # become exact ties, which KS rightly flags; the moments below still hold there.
        ks = stats.kstest(gaps, "gamma", args=(shape, 0, 1 / (rate * shape)))
        assert ks.pvalue > 0.01, ks
    mean = sum(gaps) / len(gaps)
    sd = math.sqrt(sum((g - mean) ** 2 for g in gaps) / (len(gaps) - 1))
    assert mean == pytest.approx(1 / rate, rel=0.1)
    assert sd / mean == pytest.approx(cv, rel=0.1)


def test_gamma_with_cv_one_is_not_distinguishable_from_poisson():
    gaps = _gaps(_spec(ArrivalSpec(2.0, "gamma", 1.0), seed=3))
    assert stats.kstest(gaps, "expon", args=(0, 0.5)).pvalue > 0.01


def test_exponential_ks_rejects_a_wrong_rate():
    """The KS check above has power: the same gaps fail against a 10% different rate."""
    gaps = _gaps(_spec(ArrivalSpec(7.5)))
    assert stats.kstest(gaps, "expon", args=(0, 1 / 8.25)).pvalue < 1e-6


def _chi_square(counts: Counter, names: tuple[str, ...], probs: list[float]) -> float:
    n = sum(counts.values())
    observed = [counts.get(name, 0) for name in names]
    return stats.chisquare(observed, [p * n for p in probs]).pvalue


@pytest.mark.parametrize("alpha", [0.8, 1.0, 1.5])
def test_zipf_popularity_matches_power_law(alpha):
    pop = PopularitySpec(NAMES, "zipf", alpha)
    schedule = generate_schedule(_spec(ArrivalSpec(100.0), pop, seed=5))
    counts = Counter(p.adapter for p in schedule)
    probs = pop.probabilities()
    assert probs[0] / probs[1] == pytest.approx(2**alpha)
    assert _chi_square(counts, NAMES, probs) > 0.01
    assert counts[NAMES[0]] > counts[NAMES[-1]]


def test_zipf_chi_square_rejects_a_wrong_alpha():
    schedule = generate_schedule(_spec(ArrivalSpec(100.0), PopularitySpec(NAMES, "zipf", 1.0), seed=5))
    wrong = PopularitySpec(NAMES, "zipf", 1.2).probabilities()
    assert _chi_square(Counter(p.adapter for p in schedule), NAMES, wrong) < 1e-6


def test_uniform_popularity_over_1000_adapters():
    names = tuple(f"lora-{i:04d}" for i in range(MAX_ADAPTERS))
    pop = PopularitySpec(names)
    schedule = generate_schedule(_spec(ArrivalSpec(100.0), pop, n=50_000, seed=2))
    counts = Counter(p.adapter for p in schedule)
    assert len(counts) == MAX_ADAPTERS
    assert _chi_square(counts, names, pop.probabilities()) > 0.01


def test_base_fraction_sends_that_share_to_the_base_model():
    pop = PopularitySpec(NAMES, "zipf", 1.0, base_fraction=0.25)
    schedule = generate_schedule(_spec(ArrivalSpec(100.0), pop, n=10_000))
    share = sum(p.adapter is None for p in schedule) / len(schedule)
    assert stats.binomtest(round(share * len(schedule)), len(schedule), 0.25).pvalue > 0.01


def test_length_distributions():
    lengths = LengthSpec.parse("uniform:8:64")
    spec = _spec(ArrivalSpec(10.0), input_len=lengths, output_len=LengthSpec.parse("lognormal:100:0.6:10000"))
    schedule = generate_schedule(spec)
    inputs = [p.input_len for p in schedule]
    assert min(inputs) == 8 and max(inputs) == 64
    assert _chi_square(Counter(inputs), tuple(range(8, 65)), [1 / 57] * 57) > 0.01
    outputs = [p.output_len for p in schedule]
    assert sum(outputs) / len(outputs) == pytest.approx(100, rel=0.05)  # parameterised by the mean
    mu = math.log(100) - 0.18
    assert stats.kstest([math.log(o) for o in outputs], "norm", args=(mu, 0.6)).pvalue > 1e-4  # rounding
    assert LengthSpec.parse("fixed:7").sample(None) == 7
    assert LengthSpec.parse("12") == LengthSpec("fixed", value=12)
    capped = LengthSpec.parse("lognormal:50:2:60")
    assert all(1 <= capped.sample(r) <= 60 for r in [random.Random(i) for i in range(200)])


@pytest.mark.parametrize("bad", ["uniform:5:2", "lognormal:10", "poisson:3", "fixed:0", "fixed:x"])
def test_bad_length_specs_are_rejected(bad):
    with pytest.raises(ValueError):
        LengthSpec.parse(bad)


def test_schedule_is_seeded_and_bounded_both_ways():
    spec = WorkloadSpec(
        ArrivalSpec(50.0), PopularitySpec(NAMES, "zipf"), num_requests=1000, duration_s=2.0, seed=9
    )
    a, b = generate_schedule(spec), generate_schedule(spec)
    assert a == b
    assert a != generate_schedule(
        WorkloadSpec(spec.arrival, spec.popularity, num_requests=1000, duration_s=2.0)
    )
    assert all(p.at <= 2.0 for p in a) and 60 < len(a) < 140  # duration ends it first
    short = WorkloadSpec(ArrivalSpec(50.0), PopularitySpec(NAMES), num_requests=10, duration_s=100.0)
    assert len(generate_schedule(short)) == 10  # the count ends it first
    # Changing the length law does not move arrivals or adapter choices (separate random streams).
    other = WorkloadSpec(spec.arrival, spec.popularity, LengthSpec.parse("uniform:1:9"), num_requests=1000,
                         duration_s=2.0, seed=9)  # fmt: skip
    assert [(p.at, p.adapter) for p in generate_schedule(other)] == [(p.at, p.adapter) for p in a]
    assert [p.at for p in generate_schedule(spec.with_rate(100.0))] != [p.at for p in a]


@pytest.mark.parametrize(
    "kwargs",
    [dict(num_requests=0), dict(num_requests=100_001), dict(duration_s=0), dict(duration_s=4000)],
)
def test_unbounded_workloads_are_rejected(kwargs):
    with pytest.raises(ValueError):
        WorkloadSpec(ArrivalSpec(1.0), PopularitySpec(NAMES), **kwargs)


def test_invalid_specs():
    with pytest.raises(ValueError):
        ArrivalSpec(0.0)
    with pytest.raises(ValueError):
        ArrivalSpec(1.0, "gamma", 0.0)
    with pytest.raises(ValueError):
        PopularitySpec(tuple(f"x{i}" for i in range(MAX_ADAPTERS + 1)))
    with pytest.raises(ValueError):
        PopularitySpec((), base_fraction=0.5)
    assert generate_schedule(WorkloadSpec(ArrivalSpec(5.0), PopularitySpec((), base_fraction=1.0),
                                          num_requests=5))[0].adapter is None  # fmt: skip


def test_prompts_are_seeded_and_have_the_requested_token_count(tiny_llama_dir):
    from transformers import AutoTokenizer

    from clients.loadgen.prompts import PromptFactory

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    words = PromptFactory(3, tok)
    for n in (1, 7, 40, 200):
        assert len(tok.encode(words.prompt(5, n), add_special_tokens=False)) == n
    assert words.prompt(5, 40) == PromptFactory(3, tok).prompt(5, 40) != words.prompt(6, 40)
    vocab = PromptFactory(3, tok, "vocab")
    assert all(1 <= len(tok.encode(vocab.prompt(i, 30), add_special_tokens=False)) <= 30 for i in range(10))
    assert len(PromptFactory(0).prompt(0, 12).split()) == 12  # no tokenizer: one word per token
    with pytest.raises(ValueError):
        PromptFactory(0, None, "vocab")
