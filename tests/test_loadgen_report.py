"""Report numbers, the SLO sweep search, the loopback guard and the plots (no server needed)."""

from __future__ import annotations

import asyncio
import json
import math

import numpy as np
import pytest

from clients.loadgen.record import RequestRecord
from clients.loadgen.report import BASE_LABEL, percentile, summarize
from clients.loadgen.sweep import meets_slo, sweep
from clients.loadgen.target import TargetNotAllowed, check_target


def _rec(i, adapter, ttft, e2e, tokens=4, error=None) -> RequestRecord:
    r = RequestRecord(i, adapter, scheduled_at=float(i))
    if error:
        r.error_kind, r.finished_at = error, i + 0.01
        return r
    r.first_token_at = i + ttft
    step = (e2e - ttft) / max(tokens - 1, 1)
    r.chunk_times = [i + ttft + k * step for k in range(tokens)]
    r.finished_at, r.output_tokens = i + e2e, tokens
    return r


def test_percentile_matches_numpy():
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 100, 1001):
        values = rng.exponential(size=n).tolist()
        for q in (0, 50, 90, 99, 100):
            assert percentile(values, q) == pytest.approx(np.percentile(values, q))
    assert math.isnan(percentile([], 50))


def test_summarize_counts_throughput_latency_errors_and_adapters():
    records = [_rec(i, "a" if i % 2 else None, ttft=0.1 * (i + 1), e2e=1.0 + i) for i in range(10)]
    records += [
        _rec(10, "b", 0, 0, error="429"),
        _rec(11, "b", 0, 0, error="429"),
        _rec(12, "a", 0, 0, error="500"),
    ]
    report = summarize(records, duration_s=20.0, offered_rate=0.5)
    assert (report.requests, report.ok, report.errors) == (13, 10, {"429": 2, "500": 1})
    assert report.request_throughput == pytest.approx(10 / 20)
    assert report.output_token_throughput == pytest.approx(40 / 20)
    ttfts = [0.1 * (i + 1) for i in range(10)]
    assert report.ttft.p50 == pytest.approx(np.percentile(ttfts, 50))
    assert report.ttft.p99 == pytest.approx(np.percentile(ttfts, 99))
    assert report.e2e.p90 == pytest.approx(np.percentile([1.0 + i for i in range(10)], 90))
    assert report.itl.count == 10 * 3
    by_name = {a.adapter: a for a in report.per_adapter}
    assert set(by_name) == {"a", "b", BASE_LABEL}
    assert (by_name["a"].requests, by_name["a"].ok, by_name["a"].errors) == (6, 5, 1)
    assert (by_name["b"].ok, by_name["b"].errors) == (0, 2)
    assert math.isnan(by_name["b"].ttft.p50)
    data = json.loads(json.dumps(report.to_dict()))  # NaN becomes null, so strict JSON parsers accept it
    assert next(a for a in data["per_adapter"] if a["adapter"] == "b")["ttft"]["p50"] is None
    table = report.table()
    for needle in ("13 requests", "0.50 req/s", "TTFT", "429", "per adapter"):
        assert needle in table


def _fake_report(rate: float, capacity: float, slo: float):
    """A server that keeps p99 TTFT at slo/2 below ``capacity`` and blows up above it."""
    n = 50
    ttft = slo / 2 if rate <= capacity else slo * 10
    return summarize(
        [_rec(i, None, ttft, ttft + 0.1) for i in range(n)], duration_s=n / rate, offered_rate=rate
    )


def test_sweep_search_brackets_the_capacity():
    slo, capacity = 0.5, 13.0
    calls: list[float] = []

    async def run_at(rate):
        calls.append(rate)
        return _fake_report(rate, capacity, slo)

    result = asyncio.run(sweep(run_at, slo, start_rate=1.0, refine_steps=4))
    assert calls[:5] == [1.0, 2.0, 4.0, 8.0, 16.0]
    assert 8.0 <= result.sustainable_rate <= capacity
    assert capacity - result.sustainable_rate < 8.0 / 2**4 + 1e-9
    assert all(p.ok == (p.rate <= capacity) for p in result.points)
    assert result.to_dict()["sustainable_rate"] == result.sustainable_rate


def test_sweep_rate_list_stops_after_two_misses_and_errors_fail_the_slo():
    slo = 0.5

    async def run_at(rate):
        return _fake_report(rate, 3.0, slo)

    result = asyncio.run(sweep(run_at, slo, rates=[1, 2, 3, 4, 5, 6, 7]))
    assert [p.rate for p in result.points] == [1, 2, 3, 4, 5]
    assert result.sustainable_rate == 3
    shed = summarize([_rec(0, None, 0.1, 0.2), _rec(1, None, 0, 0, error="429")], 1.0)
    assert not meets_slo(shed, slo) and meets_slo(shed, slo, max_error_rate=0.5)
    assert not meets_slo(summarize([], 1.0), slo)


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:8000", "http://localhost:9", "http://[::1]:80", "http://127.3.4.5"]
)
def test_loopback_targets_are_allowed(url):
    assert check_target(url) == url


def test_remote_targets_need_allow_remote_with_the_same_url():
    with pytest.raises(TargetNotAllowed, match="--allow-remote"):
        check_target("http://10.1.2.3:8000")
    with pytest.raises(TargetNotAllowed):
        check_target("http://10.1.2.3:8000", allow_remote="http://10.1.2.4:8000")
    assert (
        check_target("http://10.1.2.3:8000", allow_remote="http://10.1.2.3:8000/") == "http://10.1.2.3:8000"
    )
    assert check_target("http://example.invalid", allow_remote="http://EXAMPLE.invalid:80")
    with pytest.raises(TargetNotAllowed):
        check_target("ftp://127.0.0.1/")


def test_plots_write_pngs(tmp_path):
    pytest.importorskip("matplotlib")  # in the test extra; the skip only covers a bare `pip install loraplex`
    from clients.loadgen.plots import plot_latency_cdf, plot_sweep

    recs = [_rec(i, "a", 0.01 * i, 0.1 + 0.01 * i) for i in range(20)]
    cdf = plot_latency_cdf({"ours": recs, "baseline": recs[:5]}, tmp_path / "cdf.png")

    async def run_at(rate):
        return _fake_report(rate, 4.0, 0.5)

    result = asyncio.run(sweep(run_at, 0.5, rates=[1, 2, 4, 8]))
    sw = plot_sweep({"ours": result, "baseline": result}, tmp_path / "sub" / "sweep.png")
    for path in (cdf, sw):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


@pytest.mark.parametrize("with_tqdm", [True, False])
def test_progress_bar_counts_done_and_errors(with_tqdm, monkeypatch):
    import io
    import sys

    from clients.loadgen.progress import Progress

    if not with_tqdm:
        monkeypatch.setitem(sys.modules, "tqdm", None)  # the plain fallback when tqdm is missing
    out = io.StringIO()
    bar = Progress(3, desc="run", stream=out)
    for rec in (_rec(0, None, 0.1, 0.2), _rec(1, None, 0, 0, error="429"), _rec(2, "a", 0.1, 0.3)):
        bar.update(rec)
    bar.close()
    assert (bar.done, bar.errors) == (3, 1)
    text = out.getvalue()
    assert "3/3" in text and ("errors=1" in text if with_tqdm else "1 errors" in text)
    silent = io.StringIO()
    Progress(1, enabled=False, stream=silent).update(_rec(0, None, 0.1, 0.2))
    assert silent.getvalue() == ""
