"""Soak (issue 14, point 7): not in the default suite; ``python -m pytest -m soak tests/test_soak.py -s``.

A real server process (with injected step failures, ``tests/fault_server.py``) takes mixed
completions and streams over many adapters, uploads, deletes, runtime loads, client disconnects and
invalid requests at once for ``SOAK_SECONDS`` (default and maximum 600). Then: no 5xx but the
injected ones, server RSS grew < 16 MB after warm-up, its open file descriptors are back to their
count after warm-up, and every adapter of the store is byte-identical to before.

The server runs as ``loraplex serve`` does (tcmalloc, tuned OpenMP), with one difference: its GEMM
primitive caches are capped at 16 entries (``LRU_CACHE_CAPACITY``, ``ONEDNN_PRIMITIVE_CACHE_CAPACITY``;
1,024 by default). They keep a primitive per batch shape, so with the default they grow for minutes
under varied traffic - +102 to +106 MB over 600 s, still creeping at the end, in two runs - and hide
any leak; capped, the same 600 s soak (3.3 adapter upload/delete cycles a second) grew 6 MB after
warm-up and 0 in its second half. A leak of ~0.03 MB/s fails the bound.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import statistics
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import httpx
import pytest

from tests.api_harness import tree_hash
from tests.fault_server import INJECTED
from tests.lora_fixtures import ALL_LINEAR, make_peft_adapter
from tests.server_process import ServerProcess

DURATION_S = min(float(os.environ.get("SOAK_SECONDS", "600")), 600.0)

pytestmark = [pytest.mark.soak, pytest.mark.timeout(DURATION_S + 300)]  # start-up, warm-up, drain
FAULT_RATE = 0.002
RSS_LIMIT = 16 << 20
BOUNDED_CACHES = {"LRU_CACHE_CAPACITY": "16", "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "16"}  # see the docstring
SLOW = r"(?:(\w)|(\.)|(\w))*(?(1)#|@)"


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class Tally:
    """Outcomes and latencies per kind of work; 5xx split into injected and unexpected."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: Counter = Counter()
        self.latency: dict[str, list[float]] = defaultdict(list)
        self.unexpected: list[str] = []

    def record(self, kind: str, status: int, text: str, took: float) -> None:
        with self.lock:
            self.counts[(kind, status)] += 1
            self.latency[kind].append(took)
            if status >= 500 and INJECTED not in text:
                self.unexpected.append(f"{kind} {status}: {text[:300]}")

    def injected(self) -> int:
        return sum(n for (_, status), n in self.counts.items() if status >= 500)


def _files(src: Path, config: dict | None = None) -> dict:
    cfg = json.dumps(config).encode() if config else (src / "adapter_config.json").read_bytes()
    return {
        "adapter_config.json": ("adapter_config.json", cfg),
        "adapter_model.safetensors": (
            "adapter_model.safetensors",
            (src / "adapter_model.safetensors").read_bytes(),
        ),
    }


class Workload:
    def __init__(
        self, url: str, adapters: list[str], made: dict[str, Path], allowed: Path, seed: int
    ) -> None:
        self.url, self.adapters, self.made, self.allowed = url, adapters, made, allowed
        self.tally = Tally()
        self.stop = threading.Event()
        self.rng = random.Random(seed)

    def _timed(self, kind: str, client: httpx.Client, method: str, path: str, **kw) -> httpx.Response:
        start = time.monotonic()
        r = client.request(method, f"{self.url}{path}", **kw)
        self.tally.record(kind, r.status_code, r.text, time.monotonic() - start)
        return r

    def _model(self, rng: random.Random) -> str:
        return rng.choice([*self.adapters, "tiny"])

    def completions(self, seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(timeout=60) as c:
            while not self.stop.is_set():
                body = dict(model=self._model(rng), prompt=[rng.randrange(3, 500) for _ in range(rng.randint(1, 40))],
                            max_tokens=rng.randint(1, 24), temperature=rng.choice([0, 0.8]), seed=rng.randrange(1000))  # fmt: skip
                self._timed("completion", c, "POST", "/v1/completions", json=body)

    def streams(self, seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(timeout=60) as c:
            while not self.stop.is_set():
                body = dict(model=self._model(rng), prompt="stream " * rng.randint(1, 10),
                            max_tokens=rng.randint(4, 48), stream=True, ignore_eos=True)  # fmt: skip
                start = time.monotonic()
                with c.stream("POST", f"{self.url}/v1/completions", json=body) as r:
                    lines = [line for line in r.iter_lines() if line]
                text = "\n".join(lines[-2:])
                status = r.status_code
                if status == 200 and ('"error"' in text or lines[-1:] != ["data: [DONE]"]):
                    status = 599  # an error event after the headers counts as a 5xx
                self.tally.record("stream", status, text, time.monotonic() - start)

    def disconnects(self, seed: int) -> None:
        rng = random.Random(seed)
        while not self.stop.is_set():
            body = dict(
                model=self._model(rng), prompt=[5, 6, 7], max_tokens=200, stream=True, ignore_eos=True
            )
            start = time.monotonic()
            with (
                httpx.Client(timeout=60) as c,
                c.stream("POST", f"{self.url}/v1/completions", json=body) as r,
            ):
                text = r.read().decode() if r.status_code != 200 else ""  # an error before the stream
                for _ in zip(range(rng.randint(1, 4)), r.iter_lines(), strict=False):
                    pass
                self.tally.record("disconnect", r.status_code, text, time.monotonic() - start)

    def invalid(self, seed: int) -> None:
        rng = random.Random(seed)
        cases = [
            ("POST", "/v1/completions", dict(json={"model": "nope", "prompt": "x"})),
            ("POST", "/v1/completions", dict(json={"model": "tiny", "prompt": "x", "max_tokens": -1})),
            ("POST", "/v1/completions", dict(json={"model": "tiny", "prompt": ""})),
            ("POST", "/v1/completions", dict(json={"model": "tiny", "prompt": "x", "temperature": "hot"})),
            (
                "POST",
                "/v1/completions",
                dict(content=b"{not json", headers={"content-type": "application/json"}),
            ),
            ("POST", "/v1/chat/completions", dict(json={"model": "tiny", "messages": []})),
            ("GET", "/v1/nowhere", {}),
            ("POST", "/v1/adapters", dict(data={"name": "../evil"}, files=_files(self.made["u0"]))),
            ("POST", "/v1/load_lora_adapter", dict(json={"lora_name": "x", "lora_path": "/etc"})),
        ]
        with httpx.Client(timeout=60) as c:
            while not self.stop.is_set():
                method, path, kw = rng.choice(cases)
                r = self._timed("invalid", c, method, path, **kw)
                assert 400 <= r.status_code < 500, (path, r.status_code, r.text)
                time.sleep(0.01)

    def churn(self, seed: int) -> None:
        """Uploads, uses, deletes; loads and unloads a runtime path; refuses a hostile adapter."""
        rng = random.Random(seed)
        hostile = json.loads((self.made["u0"] / "adapter_config.json").read_text())
        hostile["target_modules"] = SLOW
        i = 0
        with httpx.Client(timeout=60) as c:
            while not self.stop.is_set():
                name, src = f"churn-{i}", self.made[rng.choice(["u0", "u1"])]
                r = self._timed("upload", c, "POST", "/v1/adapters", data={"name": name}, files=_files(src))
                assert r.status_code == 201, r.text
                self._timed(
                    "completion",
                    c,
                    "POST",
                    "/v1/completions",
                    json=dict(model=name, prompt="hi", max_tokens=4),
                )
                r = self._timed("delete", c, "DELETE", f"/v1/adapters/{name}")
                assert r.status_code == 200, r.text
                r = self._timed(
                    "upload", c, "POST", "/v1/adapters", data={"name": "bad"}, files=_files(src, hostile)
                )
                assert r.status_code == 400 and "target_modules" in r.text, r.text
                load = {
                    "lora_name": "rt",
                    "lora_path": str(self.allowed / rng.choice(["u0", "u1"])),
                    "load_inplace": True,
                }
                assert self._timed("load", c, "POST", "/v1/load_lora_adapter", json=load).status_code == 200
                self._timed(
                    "completion",
                    c,
                    "POST",
                    "/v1/completions",
                    json=dict(model="rt", prompt="x", max_tokens=3),
                )
                assert (
                    self._timed(
                        "load", c, "POST", "/v1/unload_lora_adapter", json={"lora_name": "rt"}
                    ).status_code
                    == 200
                )
                i += 1

    def warm_up(self) -> None:
        """Every adapter and every kind of work once, so caches and pools are at their working size."""
        with httpx.Client(timeout=60) as c:
            for model in [*self.adapters, "tiny"]:
                c.post(f"{self.url}/v1/completions", json=dict(model=model, prompt="warm", max_tokens=4))
        for work in (self.completions, self.streams, self.disconnects, self.invalid, self.churn):
            self.stop.clear()
            t = threading.Thread(target=work, args=(0,))
            t.start()
            time.sleep(3)
            self.stop.set()
            t.join()
        self.stop.clear()


def _quiesce(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = httpx.get(f"{url}/metrics").text
        if "vllm:num_requests_running 0.0" in text and "vllm:num_requests_waiting 0.0" in text:
            time.sleep(1.0)  # let closed connections be reaped
            return
        time.sleep(0.2)
    raise AssertionError("the server did not go idle")


def test_soak(tiny_llama_dir, tmp_path):
    made = {n: make_peft_adapter(tiny_llama_dir, tmp_path / "made" / n, r=r, seed=60 + i, target_modules=t)
            for i, (n, r, t) in enumerate([("s0", 4, ALL_LINEAR), ("s1", 8, ["q_proj", "v_proj"]),
                                            ("s2", 16, ALL_LINEAR), ("u0", 8, ["q_proj", "down_proj"]),
                                            ("u1", 4, ALL_LINEAR)])}  # fmt: skip
    store, allowed = tmp_path / "store", tmp_path / "allowed"
    adapters = [f"ad-{i}" for i in range(12)]
    for i, name in enumerate(adapters):
        shutil.copytree(made[f"s{i % 3}"], store / name)
    for name in ("u0", "u1"):
        shutil.copytree(made[name], allowed / name)
    before = tree_hash(store)
    args = ["--model", str(tiny_llama_dir), "--served-model-name", "tiny", "--device", "cpu",
            "--adapter-store", str(store), "--export-dir", str(tmp_path / "exports"),
            "--allowed-lora-roots", str(allowed), "--max-loras", "4", "--max-cpu-loras", "6",
            "--num-kv-blocks", "1024", "--max-num-seqs", "16", "--drain-timeout", "5", "--log-level", "warning"]  # fmt: skip
    srv = ServerProcess(args, tmp_path / "server.log", module="tests.fault_server",
                        env={"FAULT_RATE": str(FAULT_RATE), **BOUNDED_CACHES}).start()  # fmt: skip
    try:
        rss_ready, fds_ready = _rss(srv.pid), _fds(srv.pid)
        load = Workload(srv.url, adapters, made, allowed, seed=1)
        load.warm_up()
        _quiesce(srv.url)
        rss_base, fds_base = _rss(srv.pid), _fds(srv.pid)
        load.tally = Tally()  # count the soak proper
        workers = [(load.completions, 1), (load.completions, 2), (load.streams, 3), (load.streams, 4),
                   (load.disconnects, 5), (load.invalid, 6), (load.churn, 7)]  # fmt: skip
        threads = [threading.Thread(target=fn, args=(seed,)) for fn, seed in workers]
        for t in threads:
            t.start()
        samples = []
        started = time.monotonic()
        while time.monotonic() - started < DURATION_S:
            time.sleep(min(10.0, DURATION_S / 10))
            samples.append((round(time.monotonic() - started), _rss(srv.pid) >> 20, _fds(srv.pid)))
        load.stop.set()
        for t in threads:
            t.join(timeout=120)
        _quiesce(srv.url)
        rss_end, fds_end = _rss(srv.pid), _fds(srv.pid)
        assert httpx.get(f"{srv.url}/health").status_code == 200
    finally:
        srv.kill()

    t = load.tally
    lat = {
        k: f"p50 {statistics.median(v) * 1e3:.0f} ms, max {max(v) * 1e3:.0f} ms, n={len(v)}"
        for k, v in t.latency.items()
    }
    print(f"\nsoak {DURATION_S:.0f} s: {dict(sorted(t.counts.items()))}")
    print(f"latencies: {json.dumps(lat, indent=1)}")
    print(f"RSS MiB ready {rss_ready >> 20}, after warm-up {rss_base >> 20}, end {rss_end >> 20}; "
          f"FDs ready {fds_ready}, after warm-up {fds_base}, end {fds_end}; samples (s, MiB, fds) {samples}")  # fmt: skip
    print(f"injected 5xx: {t.injected()}, unexpected 5xx: {len(t.unexpected)}")
    assert not t.unexpected, t.unexpected[:10]
    assert rss_end - rss_base < RSS_LIMIT, (rss_base, rss_end)
    assert fds_end <= fds_base, (fds_base, fds_end)
    assert tree_hash(store) == before  # the churn adapters are gone, the others byte-identical
