"""llama.cpp as a peer: ``llama-batched-bench`` for the base model, ``llama-server`` for adapters.

llama.cpp has no offline API that puts different adapters in one batch, so the offline mixed-8 run
goes through ``llama-server`` with every adapter loaded (``--lora`` each, scale 0 until a request names
it) and all requests sent at once, each naming its adapter in the ``lora`` field, as its README
documents; the server batches requests with the same adapter set together and runs the groups in turn.
The base model's offline figure is ``llama-batched-bench`` (the same prompts' shape: B sequences of
PP prompt tokens each, then TG decode steps, prefill timed in), its engine without HTTP.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from pathlib import Path

import httpx

from benchmarks.peers.assets import Assets
from benchmarks.peers.install import Peers
from benchmarks.peers.protocol import round_prompts
from benchmarks.servers import ServerProcess, free_port, http_ok


def server_argv(peers: Peers, assets: Assets, dtype: str, port: int, slots: int, max_len: int) -> list[str]:
    argv = [str(peers.llama_bin / "llama-server"), "-m", str(assets.gguf_model(dtype)), "--port", str(port),
            "--host", "127.0.0.1", "--alias", "bench", "-np", str(slots), "-c", str(slots * max_len),
            "-t", peers.llama_threads(), "--no-webui", "--lora-init-without-apply"]  # fmt: skip
    for name in assets.adapters:
        argv += ["--lora", str(assets.gguf_adapter(name, dtype))]
    return argv


def llama_server(
    peers: Peers, assets: Assets, dtype: str, slots: int, max_len: int, log: Path
) -> ServerProcess:
    port = free_port()
    argv = server_argv(peers, assets, dtype, port, slots, max_len)
    return ServerProcess("llama.cpp", argv, port, log, ready=http_ok(f"http://127.0.0.1:{port}/health"))


def base_by_default(server: ServerProcess, num_adapters: int) -> None:
    """Sets every loaded adapter's global scale to 0, so a request that names none runs the base model.

    ``--lora-init-without-apply`` should do this at start-up, but in this llama.cpp build the adapters
    still report scale 1.0 and a request without a ``lora`` field ran with all of them applied
    (checked against loraplex's and vLLM's greedy tokens); the documented ``POST /lora-adapters`` works.
    """
    body = [{"id": i, "scale": 0.0} for i in range(num_adapters)]
    httpx.post(server.url + "/lora-adapters", json=body, timeout=30).raise_for_status()
    scales = [a["scale"] for a in httpx.get(server.url + "/lora-adapters", timeout=30).json()]
    if any(scales):
        raise RuntimeError(f"llama-server kept adapter scales {scales} after setting them to 0")


def batched_bench(
    peers: Peers, assets: Assets, dtype: str, batch: int, prompt_len: int, new_tokens: int
) -> dict:
    """One ``llama-batched-bench`` run: tokens/s = generated tokens / (prefill + decode seconds)."""
    argv = [peers.llama_bin / "llama-batched-bench", "-m", assets.gguf_model(dtype), "-c",
            str(batch * (prompt_len + new_tokens)), "-b", "2048", "-ub", "512", "-npp", str(prompt_len),
            "-ntg", str(new_tokens), "-npl", str(batch), "-t", peers.llama_threads(), "--output-format", "jsonl"]  # fmt: skip
    done = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"llama-batched-bench failed: {done.stderr[-2000:]}")
    return parse_batched_bench(done.stdout + done.stderr)


def parse_batched_bench(output: str) -> dict:
    """The JSONL result line of ``llama-batched-bench --output-format jsonl`` as our figures."""
    for line in output.splitlines():
        line = line.strip()
        if line.startswith("{") and '"speed_tg"' in line:
            row = json.loads(line)
            return {"tokens_per_s": row["pl"] * row["tg"] / row["t"], "decode_tokens_per_s": row["speed_tg"],
                    "prefill_tokens_per_s": row["speed_pp"]}  # fmt: skip
    raise ValueError("no result line in llama-batched-bench output")


class LlamaCppOffline:
    """The llama.cpp column of the offline table, with the same start/run/probe/close as a Worker."""

    label = "llama.cpp"

    def __init__(self, peers: Peers, assets: Assets, dtype: str, prompts, new_tokens: int, log: Path) -> None:
        self.peers, self.assets, self.dtype = peers, assets, dtype
        self.prompts, self.new_tokens = prompts, new_tokens
        max_len = len(prompts[0]) + new_tokens + 16
        self.server = llama_server(peers, assets, dtype, len(prompts), max_len, log)
        self.start_s: float | None = None

    def start(self) -> float:
        self.server.__enter__()
        base_by_default(self.server, len(self.assets.adapters))
        self.start_s = self.server.ready_s
        return self.start_s

    def run(self, mode: str, round_: int = 1) -> dict:
        if mode == "base":
            return batched_bench(
                self.peers, self.assets, self.dtype, len(self.prompts), len(self.prompts[0]), self.new_tokens
            )
        loras = [i % len(self.assets.adapters) for i in range(len(self.prompts))]
        prompts = round_prompts(self.prompts, round_)
        seconds, outs = asyncio.run(complete_all(self.server.url, prompts, self.new_tokens, loras))
        return {"tokens_per_s": sum(map(len, outs)) / seconds}

    def run_server_base(self, round_: int = 1) -> dict:
        prompts = round_prompts(self.prompts, round_)
        seconds, outs = asyncio.run(
            complete_all(self.server.url, prompts, self.new_tokens, [None] * len(self.prompts))
        )
        return {"tokens_per_s": sum(map(len, outs)) / seconds}

    def probe(self, tokens: int) -> dict:
        base = asyncio.run(complete_all(self.server.url, self.prompts[:1], tokens, [None]))[1][0]
        adapter = asyncio.run(complete_all(self.server.url, self.prompts[1:2], tokens, [1]))[1][0]
        return {"base": base, "adapter": adapter}

    def close(self) -> None:
        if self.server.proc is not None:
            self.server.__exit__()


async def complete_all(
    url: str, prompts, new_tokens: int, loras: list[int | None]
) -> tuple[float, list[list[int]]]:
    """All prompts sent at once to ``/completion`` (token ids in, greedy, EOS ignored); wall seconds and
    the generated ids of each."""

    async def one(client: httpx.AsyncClient, prompt, lora) -> list[int]:
        body = {"prompt": prompt, "n_predict": new_tokens, "ignore_eos": True, "temperature": 0.0,
                "cache_prompt": False, "return_tokens": True,
                "lora": [] if lora is None else [{"id": lora, "scale": 1.0}]}  # fmt: skip
        r = await client.post(url + "/completion", json=body)
        r.raise_for_status()
        tokens = r.json()["tokens"]
        if len(tokens) != new_tokens:
            raise RuntimeError(f"llama-server returned {len(tokens)} tokens, asked {new_tokens}")
        return tokens

    limits = httpx.Limits(max_connections=len(prompts))
    async with httpx.AsyncClient(timeout=1800, limits=limits) as client:
        start = time.perf_counter()
        outs = await asyncio.gather(*(one(client, p, lo) for p, lo in zip(prompts, loras, strict=True)))
        return time.perf_counter() - start, list(outs)
