"""Validation cannot stall the server (issue 14, point 2).

PEFT's regexes keep their meaning but cost a bounded time, off the event loop and with the GIL
released; over-long or repeat-bomb patterns, oversize or bottomless configs and adapters with far more
tensors than the base model can hold are refused from cheap checks. While hostile uploads are being
refused, ``/health`` and a generation request keep their usual latency (+ < 200 ms).
"""

from __future__ import annotations

import json
import shutil
import statistics
import threading
import time
from pathlib import Path

import httpx
import pytest

from server.config import Settings
from server.lora.adapter import AdapterError, load_peft_adapter
from server.lora.spec import BaseModelSpec
from tests.api_harness import LiveServer
from tests.lora_fixtures import ALL_LINEAR, make_peft_adapter

# Exponential for the stdlib ``re`` on a module name (seconds to minutes, GIL held throughout), and
# past any timeout for ``regex`` too; a valid pattern in both.
SLOW = r"(?:(\w)|(\.)|(\w))*(?(1)#|@)"
PREFIX = "base_model.model."


@pytest.fixture(scope="module")
def spec(tiny_llama_spec) -> BaseModelSpec:
    return tiny_llama_spec


@pytest.fixture(scope="module")
def good(tiny_llama_dir, tmp_path_factory) -> Path:
    return make_peft_adapter(tiny_llama_dir, tmp_path_factory.mktemp("hostile") / "good", r=4,
                             target_modules=ALL_LINEAR, seed=41)  # fmt: skip


def _variant(good: Path, dst: Path, **config_changes) -> Path:
    shutil.copytree(good, dst)
    config = json.loads((dst / "adapter_config.json").read_text())
    config.update(config_changes)
    (dst / "adapter_config.json").write_text(json.dumps(config))
    return dst


def _refusal(path: Path, spec: BaseModelSpec) -> tuple[str, float]:
    start = time.monotonic()
    with pytest.raises(AdapterError) as info:
        load_peft_adapter(path, "hostile", spec, 64, path)
    return str(info.value), time.monotonic() - start


@pytest.mark.parametrize(
    "option, changes",
    [
        ("target_modules", dict(target_modules=SLOW)),
        ("exclude_modules", dict(exclude_modules=SLOW)),
        ("rank_pattern", dict(rank_pattern={SLOW: 4})),
        ("alpha_pattern", dict(alpha_pattern={SLOW: 8})),
        ("layers_pattern", dict(layers_to_transform=[0], layers_pattern=SLOW)),
    ],
)
def test_catastrophic_patterns_are_refused_in_bounded_time_naming_them(good, spec, tmp_path, option, changes):
    message, took = _refusal(_variant(good, tmp_path / "a", **changes), spec)
    assert option in message and repr(SLOW) in message and "catastrophic backtracking" in message, message
    assert took < 1.5, took


@pytest.mark.parametrize(
    "changes, expected",
    [
        (dict(target_modules="(q_proj|k_proj)|" * 400 + "v_proj"), "over the limit of 4096"),
        (dict(target_modules=r"(?:a{1000}){1000}"), "repeats too much"),
        (dict(rank_pattern={"q_proj{100000}": 4}), "repeats too much"),
        (dict(exclude_modules=5), "exclude_modules must be a list or regex"),
        (dict(layers_to_transform=["0"]), "layers_to_transform must be an integer"),
        (dict(layers_to_transform=[0], layers_pattern=7), "layers_pattern must be a string or a list"),
        (dict(rank_pattern="q_proj"), "rank_pattern must be an object"),
        (dict(rank_pattern={"(": 4}), "rank_pattern key is not a valid regex"),
    ],
)
def test_costly_or_malformed_patterns_are_refused_before_matching(good, spec, tmp_path, changes, expected):
    message, took = _refusal(_variant(good, tmp_path / "a", **changes), spec)
    assert expected in message and message.startswith("adapter 'hostile': "), message
    assert took < 0.5, took


def test_oversize_and_bottomless_configs_are_refused(good, spec, tmp_path):
    big = _variant(good, tmp_path / "big", padding="x" * (1 << 20))
    assert "over the limit of 1048576" in _refusal(big, spec)[0]
    deep = _variant(good, tmp_path / "deep")
    (deep / "adapter_config.json").write_text("[" * 200_000 + "]" * 200_000)
    message, took = _refusal(deep, spec)
    assert "not valid JSON" in message and took < 1.0


def write_many_tensors(path: Path, count: int) -> None:
    """A safetensors file of ``count`` one-float tensors with LoRA-looking keys (written directly: fast)."""
    header = {
        f"{PREFIX}model.layers.{i}.self_attn.q_proj.lora_A.weight": {
            "dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]
        }
        for i in range(count)
    }  # fmt: skip
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + b"\0" * (4 * count))


@pytest.mark.parametrize("count, expected", [(100_000, "-byte header"), (600, "holds 600 tensors")])
def test_too_many_tensors_are_refused_from_the_header(good, spec, tmp_path, count, expected):
    path = shutil.copytree(good, tmp_path / "many")
    write_many_tensors(path / "adapter_model.safetensors", count)
    message, took = _refusal(path, spec)
    assert expected in message and "56" in message, message  # 14 linears x 4 tensors
    assert took < 0.5, took


def _files(src: Path) -> dict:
    return {n: (n, (src / n).read_bytes()) for n in ("adapter_config.json", "adapter_model.safetensors")}


def _timed_get(url: str, samples: list[float], stop: threading.Event) -> None:
    with httpx.Client(timeout=30) as client:
        while not stop.is_set():
            start = time.monotonic()
            assert client.get(f"{url}/health").status_code == 200
            samples.append(time.monotonic() - start)
            time.sleep(0.02)


def _completion_latency(url: str) -> float:
    start = time.monotonic()
    body = dict(model="tiny", prompt=[1, 2, 3], max_tokens=8, temperature=0, ignore_eos=True)
    assert httpx.post(f"{url}/v1/completions", json=body, timeout=30).status_code == 200
    return time.monotonic() - start


def test_health_and_requests_keep_their_latency_while_hostile_uploads_are_refused(
    good, tiny_llama_dir, tmp_path
):
    hostile = {
        "slow-target": _variant(good, tmp_path / "h1", target_modules=SLOW),
        "slow-rank": _variant(good, tmp_path / "h2", rank_pattern={SLOW: 4}),
        "repeat-bomb": _variant(good, tmp_path / "h3", target_modules=r"(?:a{1000}){1000}"),
        "many-tensors": shutil.copytree(good, tmp_path / "h4"),
        "deep-json": shutil.copytree(good, tmp_path / "h5"),
    }
    write_many_tensors(hostile["many-tensors"] / "adapter_model.safetensors", 100_000)
    (hostile["deep-json"] / "adapter_config.json").write_text("[" * 100_000 + "]" * 100_000)
    # The two other ways an adapter gets parsed: a runtime path, and a request's background load of
    # an adapter placed in the store behind the API's back.
    shutil.copytree(hostile["many-tensors"], tmp_path / "allowed" / "hostile-path")
    shutil.copytree(hostile["slow-target"], tmp_path / "store" / "hostile-store")
    settings = Settings(model=tiny_llama_dir, served_model_name="tiny", adapter_store=tmp_path / "store",
                        device="cpu", num_kv_blocks=64, max_adapter_bytes=64 << 20,
                        allowed_lora_roots=[tmp_path / "allowed"])  # fmt: skip
    with LiveServer(settings) as srv:
        base_health: list[float] = []
        stop = threading.Event()
        poller = threading.Thread(target=_timed_get, args=(srv.url, base_health, stop))
        poller.start()
        base_completion = []  # as many probes as the hostile phase takes, so the maxima compare
        started = time.monotonic()
        while time.monotonic() - started < 6.0:
            base_completion.append(_completion_latency(srv.url))
            time.sleep(0.2)
        stop.set()
        poller.join()

        during_health: list[float] = []
        stop = threading.Event()
        poller = threading.Thread(target=_timed_get, args=(srv.url, during_health, stop))
        poller.start()
        refused = 0
        during_completion = []
        for _round in range(3):
            for name, src in hostile.items():
                r = httpx.post(f"{srv.url}/v1/adapters", data={"name": name}, files=_files(src), timeout=60)
                assert r.status_code == 400, (name, r.text)
                refused += 1
                during_completion.append(_completion_latency(srv.url))
            load = {"lora_name": "hostile-path", "lora_path": str(tmp_path / "allowed" / "hostile-path")}
            r = httpx.post(f"{srv.url}/v1/load_lora_adapter", json=load, timeout=60)
            assert r.status_code == 400 and "header" in r.text, r.text
            body = {"model": "hostile-store", "prompt": "x", "max_tokens": 2}
            r = httpx.post(f"{srv.url}/v1/completions", json=body, timeout=60)
            assert r.status_code == 400 and "catastrophic backtracking" in r.text, r.text
            refused += 2
        stop.set()
        poller.join()
        assert [p.name for p in (tmp_path / "store").iterdir()] == ["hostile-store"]

    med = statistics.median
    report = (
        f"{refused} hostile adapters refused (uploads, runtime loads, background loads); /health p50 {med(base_health) * 1e3:.1f} -> "
        f"{med(during_health) * 1e3:.1f} ms, max {max(base_health) * 1e3:.1f} -> "
        f"{max(during_health) * 1e3:.1f} ms ({len(during_health)} probes); completion p50 "
        f"{med(base_completion) * 1e3:.1f} -> {med(during_completion) * 1e3:.1f} ms, max "
        f"{max(base_completion) * 1e3:.1f} -> {max(during_completion) * 1e3:.1f} ms"
    )
    print(report)
    # Every hostile input is sent in each of the 3 rounds, so a stall it causes shows at least 3
    # times: the third-slowest probe is compared, which a single hiccup of a shared 2-core machine
    # (seen in CI: /health and a completion both ~0.3 s at the same instant) does not move.
    assert third_slowest(during_health) < max(base_health) + 0.2, report
    assert third_slowest(during_completion) < max(base_completion) + 0.2, report


def third_slowest(samples: list[float]) -> float:
    return sorted(samples)[-3]
