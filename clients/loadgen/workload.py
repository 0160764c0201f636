"""Workload description and the seeded, pure schedule it expands into (S-LoRA / Punica style).

A workload is an open-loop arrival process (Poisson, or Gamma with a coefficient of variation for
burstier traffic), a popularity law over N adapters (uniform or Zipf(alpha), as in S-LoRA's power-law
setting), and input/output length distributions. :func:`generate_schedule` turns it into a list of
timed requests with no I/O, so the statistics can be tested on their own and two servers can be driven
with exactly the same requests.
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
from dataclasses import asdict, dataclass, field
from typing import Literal

MAX_REQUESTS = 100_000  # hard bounds: a load test must end on its own
MAX_DURATION_S = 3600.0
MAX_ADAPTERS = 1000


@dataclass(frozen=True)
class ArrivalSpec:
    """Open-loop arrivals at ``rate`` req/s. Gamma with ``cv`` > 1 is burstier, < 1 smoother; cv=1 is Poisson."""

    rate: float
    process: Literal["poisson", "gamma"] = "poisson"
    cv: float = 1.0

    def __post_init__(self) -> None:
        if not self.rate > 0:
            raise ValueError("arrival rate must be > 0")
        if self.process not in ("poisson", "gamma"):
            raise ValueError(f"unknown arrival process {self.process!r}")
        if not self.cv > 0:
            raise ValueError("cv must be > 0")

    def sample_gap(self, rng: random.Random) -> float:
        """One inter-arrival time in seconds (mean 1/rate)."""
        if self.process == "poisson":
            return rng.expovariate(self.rate)
        shape = 1.0 / (self.cv * self.cv)  # Gamma(k, theta): mean k*theta, cv 1/sqrt(k)
        return rng.gammavariate(shape, 1.0 / (self.rate * shape))


@dataclass(frozen=True)
class PopularitySpec:
    """Which adapter each request uses: ``uniform`` or ``zipf`` (P(rank i) ∝ i^-alpha) over ``names``.

    ``base_fraction`` of the requests go to the base model (adapter None) before the law is applied.
    """

    names: tuple[str, ...]
    kind: Literal["uniform", "zipf"] = "uniform"
    alpha: float = 1.0
    base_fraction: float = 0.0

    def __post_init__(self) -> None:
        if len(self.names) > MAX_ADAPTERS:
            raise ValueError(f"at most {MAX_ADAPTERS} adapters")
        if self.kind not in ("uniform", "zipf"):
            raise ValueError(f"unknown popularity {self.kind!r}")
        if self.alpha <= 0:
            raise ValueError("zipf alpha must be > 0")
        if not 0.0 <= self.base_fraction <= 1.0:
            raise ValueError("base_fraction must be in [0, 1]")
        if not self.names and self.base_fraction < 1.0:
            raise ValueError("no adapter names: set base_fraction=1 to load the base model only")

    def probabilities(self) -> list[float]:
        """P(adapter i) for i in rank order, before ``base_fraction`` is taken out."""
        n = len(self.names)
        if self.kind == "uniform":
            return [1.0 / n] * n
        weights = [1.0 / (i**self.alpha) for i in range(1, n + 1)]
        total = sum(weights)
        return [w / total for w in weights]


@dataclass(frozen=True)
class LengthSpec:
    """A token-length distribution: ``fixed:N``, ``uniform:LO:HI`` or ``lognormal:MEAN:SIGMA[:MAX]``.

    Lognormal is parameterised by its mean (not the median) so the offered token load is what the spec
    says; samples are clamped to [1, max].
    """

    kind: Literal["fixed", "uniform", "lognormal"] = "fixed"
    value: int = 32  # fixed; lognormal mean
    low: int = 1
    high: int = 1
    sigma: float = 0.5
    max: int = 4096

    def __post_init__(self) -> None:
        if self.kind not in ("fixed", "uniform", "lognormal"):
            raise ValueError(f"unknown length distribution {self.kind!r}")
        if self.kind == "uniform" and not 1 <= self.low <= self.high:
            raise ValueError("uniform lengths need 1 <= low <= high")
        if self.kind != "uniform" and self.value < 1:
            raise ValueError("length must be >= 1")
        if self.sigma < 0:
            raise ValueError("sigma must be >= 0")

    @classmethod
    def parse(cls, text: str) -> LengthSpec:
        parts = text.strip().split(":")
        kind, args = parts[0].lower(), parts[1:]
        try:
            if kind == "fixed" and len(args) == 1:
                return cls("fixed", value=int(args[0]))
            if kind == "uniform" and len(args) == 2:
                return cls("uniform", low=int(args[0]), high=int(args[1]))
            if kind == "lognormal" and len(args) in (2, 3):
                cap = int(args[2]) if len(args) == 3 else 4096
                return cls("lognormal", value=int(args[0]), sigma=float(args[1]), max=cap)
            if kind.isdigit() and not args:
                return cls("fixed", value=int(kind))
        except ValueError as exc:
            raise ValueError(f"bad length spec {text!r}: {exc}") from exc
        raise ValueError(
            f"bad length spec {text!r}; use fixed:N, uniform:LO:HI or lognormal:MEAN:SIGMA[:MAX]"
        )

    def sample(self, rng: random.Random) -> int:
        if self.kind == "fixed":
            return self.value
        if self.kind == "uniform":
            return rng.randint(self.low, self.high)
        mu = math.log(self.value) - self.sigma * self.sigma / 2.0
        return max(1, min(self.max, round(rng.lognormvariate(mu, self.sigma))))

    @property
    def mean(self) -> float:
        return (self.low + self.high) / 2.0 if self.kind == "uniform" else float(self.value)


@dataclass(frozen=True)
class WorkloadSpec:
    """Everything that defines the requests of one run. Ends at ``num_requests`` or ``duration_s``, first."""

    arrival: ArrivalSpec
    popularity: PopularitySpec
    input_len: LengthSpec = field(default_factory=lambda: LengthSpec("fixed", value=32))
    output_len: LengthSpec = field(default_factory=lambda: LengthSpec("fixed", value=16))
    num_requests: int = 200
    duration_s: float = 60.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.num_requests <= MAX_REQUESTS:
            raise ValueError(f"num_requests must be in [1, {MAX_REQUESTS}]")
        if not 0 < self.duration_s <= MAX_DURATION_S:
            raise ValueError(f"duration_s must be in (0, {MAX_DURATION_S}]")

    def with_rate(self, rate: float) -> WorkloadSpec:
        """Same workload at another offered rate (what a sweep varies)."""
        arrival = ArrivalSpec(rate, self.arrival.process, self.arrival.cv)
        return WorkloadSpec(
            arrival,
            self.popularity,
            self.input_len,
            self.output_len,
            self.num_requests,
            self.duration_s,
            self.seed,
        )

    def to_dict(self) -> dict:
        data = asdict(self)
        names = data["popularity"].pop("names")
        data["popularity"]["num_adapters"] = len(names)
        return data


@dataclass(frozen=True)
class PlannedRequest:
    """One request of the schedule: send at ``at`` seconds after the start."""

    index: int
    at: float
    adapter: str | None
    input_len: int
    output_len: int


def generate_schedule(spec: WorkloadSpec) -> list[PlannedRequest]:
    """Expand a workload into timed requests; the same spec (seed included) gives the same list.

    Separate random streams for arrivals, adapters and lengths keep each property's statistics
    independent of the others (changing the length law does not move the arrival times).
    """
    arrivals = random.Random(f"{spec.seed}:arrivals")
    choose = random.Random(f"{spec.seed}:adapters")
    lengths = random.Random(f"{spec.seed}:lengths")
    pop = spec.popularity
    cum = list(itertools.accumulate(pop.probabilities())) if pop.names else []

    out: list[PlannedRequest] = []
    t = 0.0
    for index in range(spec.num_requests):
        t += spec.arrival.sample_gap(arrivals)
        if t > spec.duration_s:
            break
        adapter = None
        if choose.random() >= pop.base_fraction:
            pick = bisect.bisect_right(cum, choose.random() * cum[-1])
            adapter = pop.names[min(pick, len(pop.names) - 1)]
        out.append(
            PlannedRequest(index, t, adapter, spec.input_len.sample(lengths), spec.output_len.sample(lengths))
        )
    return out
