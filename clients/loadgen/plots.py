"""PNG plots of load runs (matplotlib, from the ``loadtest`` extra; imported only when plotting).

Three views: the latency CDF of one or more runs (TTFT and end-to-end side by side); for sweeps the
achieved throughput and p99 TTFT against offered load, with the SLO drawn in, one line per server; and
the adapter timeline of runs sampled from /metrics (adapter loads per second, slot hit rate).
"""

from __future__ import annotations

from pathlib import Path

from clients.loadgen.record import RequestRecord
from clients.loadgen.sweep import SweepResult
from clients.loadgen.timeline import TimelinePoint


def _pyplot():
    try:
        import matplotlib
    except ImportError as exc:  # pragma: no cover - depends on the installed extras
        raise RuntimeError("plots need matplotlib: pip install 'loraplex[loadtest]'") from exc
    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def _cdf(values: list[float]) -> tuple[list[float], list[float]]:
    xs = sorted(values)
    n = len(xs)
    return xs, [(i + 1) / n for i in range(n)]


def plot_latency_cdf(runs: dict[str, list[RequestRecord]], path: str | Path) -> Path:
    """CDF of TTFT and end-to-end latency (successful requests), one curve per labelled run."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for label, records in runs.items():
        ok = [r for r in records if r.ok]
        for ax, values in (
            (axes[0], [r.ttft * 1000 for r in ok if r.ttft is not None]),
            (axes[1], [r.e2e * 1000 for r in ok if r.e2e is not None]),
        ):
            if values:
                xs, ys = _cdf(values)
                ax.step(xs, ys, where="post", label=f"{label} (n={len(values)})")
    for ax, title in zip(axes, ("time to first token", "end-to-end latency"), strict=True):
        ax.set_title(title)
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction of requests")
        ax.set_ylim(0, 1.01)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    return _save(fig, plt, path)


def plot_sweep(sweeps: dict[str, SweepResult], path: str | Path) -> Path:
    """Achieved req/s and p99 TTFT vs offered req/s per server; the SLO as a dashed line."""
    plt = _pyplot()
    fig, (ax_tp, ax_p99) = plt.subplots(1, 2, figsize=(11, 4))
    slo = None
    for label, result in sweeps.items():
        points = sorted(result.points, key=lambda p: p.rate)
        rates = [p.rate for p in points]
        ax_tp.plot(rates, [p.report.request_throughput for p in points], marker="o", label=label)
        ax_p99.plot(rates, [p.report.ttft.p99 * 1000 for p in points], marker="o", label=label)
        if result.best is not None:
            ax_tp.axvline(result.best.rate, linestyle=":", alpha=0.5, color=ax_tp.lines[-1].get_color())
        slo = result.slo_ttft_p99_s
    if slo is not None:
        ax_p99.axhline(slo * 1000, linestyle="--", color="red", label=f"SLO {slo * 1000:.0f} ms")
    ax_tp.set_title("throughput vs offered load")
    ax_tp.set_xlabel("offered load (req/s)")
    ax_tp.set_ylabel("achieved (req/s)")
    ax_p99.set_title("p99 TTFT vs offered load")
    ax_p99.set_xlabel("offered load (req/s)")
    ax_p99.set_ylabel("p99 TTFT (ms)")
    ax_p99.set_yscale("log")
    for ax in (ax_tp, ax_p99):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, plt, path)


def plot_adapter_timeline(runs: dict[str, list[TimelinePoint]], path: str | Path) -> Path:
    """Per labelled run: adapter loads from disk and slot copies per second, the slot hit rate, and
    the mean batch (sequences per engine step: how full few slots let the batches be)."""
    plt = _pyplot()
    fig, (ax_loads, ax_hits, ax_batch) = plt.subplots(3, 1, figsize=(10, 8.5), sharex=True)
    for label, points in runs.items():
        xs = [p.mid for p in points]
        line = ax_loads.plot(xs, [p.loads_per_s for p in points], label=f"{label}: disk loads")[0]
        ax_loads.plot(xs, [p.activations_per_s for p in points], linestyle="--", color=line.get_color(),
                      label=f"{label}: slot copies")  # fmt: skip
        ax_hits.plot(xs, [p.slot_hit_rate * 100 for p in points], marker=".", label=label)
        ax_batch.plot(xs, [p.mean_batch for p in points], marker=".", label=label)
    ax_loads.set_title("adapter loads")
    ax_loads.set_ylabel("per second")
    ax_hits.set_title("slot hit rate (requests scheduled with their adapter already in a slot)")
    ax_hits.set_ylabel("%")
    ax_hits.set_ylim(0, 101)
    ax_batch.set_title("mean batch (sequences per engine step)")
    ax_batch.set_ylabel("sequences")
    ax_batch.set_xlabel("seconds into the run")
    for ax in (ax_loads, ax_hits, ax_batch):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    return _save(fig, plt, path)


def _save(fig, plt, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
