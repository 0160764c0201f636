"""``make gpu-check``: one command that checks and measures the CUDA serving path on one GPU.

Parts, each time-boxed inside an overall budget (default 450 s, so the whole run with its set-up
fits 8 minutes on one H100/H200), each writing its results as soon as it ends:

  env       the device, its peak HBM bandwidth (NVML, else a table) and a measured copy bandwidth
  http      the server as users start it (``python -m server serve``): ready, two greedy completions
  kernels   (a) Triton paged attention (prefill, decode; GQA, ragged, windows, soft-cap) and the Triton
            LoRA op, bf16, against torch references in fp32
  engine    (b) greedy tokens and logits of 8 PEFT adapters (plus base rows) in one mixed batch vs
            HF+PEFT on the same GPU; (c) CUDA graphs on vs off: identical tokens and logits
  bench     (d) random-weight Llama-3.2-1B- and Llama-3-8B-shaped models built on the GPU, 64 rank-16
            adapters on all seven projections: decode step time and throughput for base-only, 8 and
            64 distinct adapters at batch 1/8/32/64 and context 512/2048, TTFT, ITL, the fraction of
            the HBM roofline each decode step reaches, and transformers ``generate`` / PEFT mixed
            baselines on the same device and dtype

Writes ``gpu-check.md`` and ``gpu-check.json`` into ``--out`` (default: the repository root).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent

# Datasheet HBM bandwidth (bytes/s) by device-name fragment, used when NVML cannot say.
PEAK_BANDWIDTH = [
    ("H200", 4.8e12), ("H100 NVL", 3.9e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12), ("GH200", 4.0e12),
    ("A100-SXM4-80GB", 2.039e12), ("A100 80GB PCIe", 1.935e12), ("A100", 1.555e12), ("L40S", 0.864e12),
    ("L4", 0.3e12), ("A10", 0.6e12), ("RTX 4090", 1.008e12), ("RTX 3090", 0.936e12),
]  # fmt: skip


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.budget = seconds
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def expired(self) -> bool:
        return self.left() <= 0


@dataclass
class Report:
    """Results so far, rewritten to disk after every part (a timeout still leaves them)."""

    out_dir: Path
    data: dict = field(default_factory=dict)
    sections: dict[str, list[str]] = field(default_factory=dict)

    def add(self, key: str, value, markdown: list[str]) -> None:
        self.data[key] = value
        self.sections[key] = markdown
        self.write()

    def write(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "gpu-check.json").write_text(json.dumps(self.data, indent=2, default=str))
        lines = ["# loraplex GPU check", ""]
        for section in self.sections.values():
            lines += section + [""]
        (self.out_dir / "gpu-check.md").write_text("\n".join(lines))


def peak_bandwidth() -> tuple[float | None, str]:
    """(bytes/s, source): NVML's memory clock x bus width, else the datasheet table."""
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        clock_hz = pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_MEM) * 1e6
        bus_bits = pynvml.nvmlDeviceGetMemoryBusWidth(handle)
        if clock_hz and bus_bits:
            return clock_hz * bus_bits * 2 / 8, "NVML (max memory clock x bus width x 2)"
    except Exception:  # no NVML bindings or no permission: fall back to the table
        pass
    name = torch.cuda.get_device_name()
    for fragment, bandwidth in PEAK_BANDWIDTH:
        if fragment in name:
            return bandwidth, f"datasheet table ({fragment})"
    return None, "unknown device"


def copy_bandwidth(gib: float = 2.0, repeats: int = 10) -> float:
    """Measured device-to-device copy, bytes read plus written per second (median of ``repeats``)."""
    src = torch.empty(int(gib * 2**30), dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats + 2):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) / 1e3)
    del src, dst
    return 2 * gib * 2**30 / sorted(times[2:])[repeats // 2]


def environment(plan) -> tuple[dict, list[str]]:
    import transformers
    import triton

    env = {
        "torch": torch.__version__,
        "triton": triton.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "plan": "smoke (CPU, tiny shapes: numbers are meaningless)" if not plan.cuda else "gpu",
    }
    if plan.cuda:
        props = torch.cuda.get_device_properties(0)
        peak, source = peak_bandwidth()
        env.update(device=torch.cuda.get_device_name(), sms=props.multi_processor_count,
                   memory_gib=round(props.total_memory / 2**30, 1), peak_bandwidth_tb_s=peak / 1e12 if peak else None,
                   peak_bandwidth_source=source, copy_bandwidth_tb_s=round(copy_bandwidth() / 1e12, 3))  # fmt: skip
    md = ["## Environment", "", "| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in env.items()]
    return env, md


def http_smoke(plan, deadline) -> tuple[dict, list[str]]:
    """The real server as a user starts it (``python -m server serve`` on the demo model, CUDA graphs
    on): ready, then one greedy completion through an adapter and one through the base model."""
    import sys

    import httpx

    from benchmarks.servers import ServerProcess, free_port

    port = free_port()
    cmd = [sys.executable, "-m", "server", "serve", "--port", str(port), "--device", plan.device,
           "--gpu-memory-utilization", "0.3", "--max-num-seqs", "16", "--attention-backend", plan.attention_backend,
           "--lora-backend", plan.lora_backend]  # fmt: skip
    log = Path(tempfile.mkstemp(suffix=".log")[1])
    result = {}
    try:
        with ServerProcess("loraplex", cmd, port, log, timeout_s=max(deadline.left() - 5, 1)) as server:
            result["ready_s"] = round(server.ready_s, 1)
            for model in ("demo-code", "demo"):
                body = {"model": model, "prompt": "def ", "max_tokens": 16, "temperature": 0}
                r = httpx.post(
                    f"{server.url}/v1/completions", json=body, timeout=max(30.0, deadline.left() - 10)
                )
                result[model] = {
                    "status": r.status_code,
                    "text": r.json()["choices"][0]["text"] if r.is_success else r.text,
                }
    except Exception as exc:  # reported with the server's log below
        result["error"] = f"{type(exc).__name__}: {exc}"
    tail = log.read_text()[-1500:]
    ok = "error" not in result and all(result.get(m, {}).get("status") == 200 for m in ("demo-code", "demo"))
    result.update(passed=ok, server_log_tail=tail)
    md = ["## HTTP smoke (python -m server serve, demo model)", "",
          f"Pass: **{ok}**, ready after {result.get('ready_s')} s {result.get('error', '')}", ""]  # fmt: skip
    md += [f"- `{k}`: {v['status']} {v['text']!r}" for k, v in result.items() if k.startswith("demo")]
    if not ok:
        md += ["", "Server log (tail):", "", "```", tail, "```"]
    return result, md


def run_part(
    report: Report, key: str, seconds: float, fn: Callable[[Deadline], tuple[object, list[str]]]
) -> None:
    """Runs one part under its own deadline; a failure is recorded, and the next part still runs."""
    start = time.monotonic()
    print(f"\n=== {key} (budget {seconds:.0f} s)", flush=True)
    try:
        value, md = fn(Deadline(seconds))
    except Exception as exc:
        value = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-4000:]}
        md = [
            f"## {key}",
            "",
            f"**FAILED**: `{type(exc).__name__}: {exc}`",
            "",
            "```",
            traceback.format_exc()[-2000:],
            "```",
        ]
        print(traceback.format_exc(), flush=True)
    elapsed = time.monotonic() - start
    report.data.setdefault("seconds", {})[key] = round(elapsed, 1)
    report.add(key, value, md + ["", f"_{key}: {elapsed:.0f} s_"])
    print("\n".join(md), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=REPO, help="where gpu-check.md/json are written")
    parser.add_argument("--budget", type=float, default=450.0, help="seconds for all parts together")
    parser.add_argument(
        "--parts", default="env,kernels,engine,http,bench-1b,bench-8b", help="comma-separated"
    )
    parser.add_argument("--smoke", action="store_true",
                        help="run every part on the CPU with tiny shapes (needs TRITON_INTERPRET=1); numbers are meaningless")  # fmt: skip
    args = parser.parse_args(argv)
    from benchmarks import gpu_bench, gpu_parity
    from benchmarks.gpu_plan import GPU, SMOKE

    plan = SMOKE if args.smoke else GPU
    if plan.cuda and not torch.cuda.is_available():
        print(
            "gpu-check needs a CUDA device (torch.cuda.is_available() is False); --smoke runs it on the CPU"
        )
        return 2
    report = Report(args.out)
    total = Deadline(args.budget)
    shares = {"env": 0.03, "kernels": 0.11, "engine": 0.16, "http": 0.08, "bench-1b": 0.2, "bench-8b": 0.42}
    with tempfile.TemporaryDirectory() as tmp:
        parts = {
            "env": lambda d: environment(plan),
            "kernels": lambda d: gpu_parity.kernel_parity(plan, d),
            "engine": lambda d: gpu_parity.engine_checks(plan, Path(tmp), d),
            "http": lambda d: http_smoke(plan, d),
            "bench-1b": lambda d: gpu_bench.bench_shape(plan, "1b", Path(tmp), d, report.data.get("env", {})),
            "bench-8b": lambda d: gpu_bench.bench_shape(plan, "8b", Path(tmp), d, report.data.get("env", {})),
        }
        wanted = [p for p in args.parts.split(",") if p]
        for i, key in enumerate(wanted):
            later = sum(shares[k] for k in wanted[i:])
            run_part(report, key, max(10.0, total.left() * shares[key] / later), parts[key])
            if plan.cuda:
                torch.cuda.empty_cache()
    report.add("summary", gpu_bench.targets(report.data), gpu_bench.targets_markdown(report.data))
    print(f"\nwrote {args.out / 'gpu-check.md'} and {args.out / 'gpu-check.json'}")
    failed = [k for k, v in report.data.items() if isinstance(v, dict) and "error" in v]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
