"""Failure behaviour of the HTTP API (issue #4), each over real HTTP against the real engine:
429 with Retry-After, disconnects free KV blocks, a bad adapter or a failing step fails only its own
requests, concurrent uploads, failed uploads leave the store untouched, shutdown drains."""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

from server.config import Settings
from tests.api_harness import LiveServer, greedy_ids, peft_model, token_ids_of, tree_hash
from tests.lora_fixtures import make_peft_adapter
from tests.model_factory import make_tiny_model

BASE = "tiny"


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_llama_dir):
    root = tmp_path_factory.mktemp("api_failures")
    good = make_peft_adapter(tiny_llama_dir, root / "made" / "good", r=8, seed=11)
    return dict(root=root, model_dir=tiny_llama_dir, good=good)


def settings(env, store: Path, **overrides) -> Settings:
    base = dict(
        model=env["model_dir"],
        served_model_name=BASE,
        adapter_store=store,
        export_dir=env["root"] / "exports",
        device="cpu",
        num_kv_blocks=256,
        max_model_len=512,
    )
    return Settings(**{**base, **overrides})


def fresh_store(env, name: str, adapters: dict[str, Path] | None = None) -> Path:
    store = env["root"] / name
    store.mkdir()
    for adapter, path in (adapters or {}).items():
        shutil.copytree(path, store / adapter)
    return store


def slow_steps(engine, seconds: float) -> None:
    """Makes every engine step take at least ``seconds`` so requests stay in flight long enough."""
    runner = engine.core.runner
    run = runner.run

    def slow(*args, **kwargs):
        time.sleep(seconds)
        return run(*args, **kwargs)

    runner.run = slow


def wait_for(predicate, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def raw_request(port: int, path: str, body: dict) -> socket.socket:
    """A request whose connection the test can drop at will (a client going away)."""
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port))
    head = f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    sock.sendall(head.encode() + data)
    return sock


def drop(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


def kv_all_free(engine) -> bool:
    bm = engine.core.block_manager
    stats = engine.stats()
    return bm.num_free_blocks == bm.num_blocks and stats.num_running == 0 and stats.num_waiting == 0


def long_body(**extra) -> dict:
    return {**dict(model=BASE, prompt=[5, 6, 7, 8], max_tokens=400, temperature=0, ignore_eos=True), **extra}


def test_queue_full_is_429_with_retry_after_and_disconnects_free_everything(env):
    store = fresh_store(env, "store_429")
    with LiveServer(settings(env, store, max_num_seqs=1, max_queue_len=1)) as srv:
        slow_steps(srv.engine, 0.01)
        running = raw_request(srv.port, "/v1/completions", long_body(stream=True))
        wait_for(lambda: srv.engine.stats().num_running == 1, what="a running request")
        waiting = raw_request(srv.port, "/v1/completions", long_body())
        wait_for(lambda: srv.engine.stats().num_waiting == 1, what="a waiting request")
        r = httpx.post(f"{srv.url}/v1/completions", json=long_body(max_tokens=4), timeout=10)
        assert r.status_code == 429
        assert r.headers["retry-after"] == "1"
        assert r.json()["error"]["type"] == "rate_limit_exceeded"
        assert srv.engine.core.block_manager.num_free_blocks < srv.engine.core.block_manager.num_blocks
        drop(waiting)
        drop(running)
        wait_for(lambda: kv_all_free(srv.engine), timeout=5, what="KV blocks freed after disconnects")
        assert (
            httpx.post(f"{srv.url}/v1/completions", json=long_body(max_tokens=4), timeout=10).status_code
            == 200
        )


@pytest.mark.parametrize("stream", [False, True])
def test_client_disconnect_aborts_and_frees_kv_blocks(env, stream):
    store = fresh_store(env, f"store_disconnect_{stream}")
    with LiveServer(settings(env, store)) as srv:
        slow_steps(srv.engine, 0.01)  # 400 tokens would take > 4 s
        sock = raw_request(srv.port, "/v1/completions", long_body(stream=stream))
        wait_for(lambda: srv.engine.stats().num_running == 1, what="the request to run")
        if stream:
            assert sock.recv(64).startswith(b"HTTP/1.1 200")  # headers sent: the stream is live
        start = time.monotonic()
        drop(sock)
        wait_for(lambda: kv_all_free(srv.engine), timeout=3, what="KV blocks freed")
        assert time.monotonic() - start < 3
        metrics = httpx.get(f"{srv.url}/metrics").text
        assert 'loraplex_request_finished_total{finish_reason="abort"} 1.0' in metrics


def test_bad_adapter_fails_only_its_own_requests(env):
    store = fresh_store(env, "store_bad", {"good": env["good"]})
    broken = shutil.copytree(env["good"], store / "broken")  # written behind the store API's back
    weights = broken / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    prompt = [9, 8, 7, 6, 5]
    want_good = greedy_ids(peft_model(env["model_dir"], {"good": env["good"]}), prompt, 6)
    want_base = greedy_ids(peft_model(env["model_dir"]), prompt, 6)

    with LiveServer(settings(env, store)) as srv:
        slow_steps(srv.engine, 0.005)
        results: dict[int, httpx.Response] = {}
        jobs = ["good", "broken", BASE, "good", "broken", BASE]

        def call(i: int, model: str) -> None:
            body = dict(model=model, prompt=prompt, max_tokens=6, temperature=0, ignore_eos=True, logprobs=0)
            body["return_tokens_as_token_ids"] = True
            results[i] = httpx.post(f"{srv.url}/v1/completions", json=body, timeout=30)

        threads = [threading.Thread(target=call, args=(i, m)) for i, m in enumerate(jobs)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for i, model in enumerate(jobs):
            r = results[i]
            if model == "broken":
                assert r.status_code == 400, r.text
                assert "could not be loaded" in r.json()["error"]["message"]
            else:
                assert r.status_code == 200, r.text
                want = want_good if model == "good" else want_base
                assert token_ids_of(r.json()["choices"][0]["logprobs"]) == want
        # Streaming: the error arrives as a real status, before any SSE byte.
        body = dict(model="broken", prompt=prompt, max_tokens=4, stream=True)
        with httpx.stream("POST", f"{srv.url}/v1/completions", json=body, timeout=30) as r:
            assert r.status_code == 400
        assert kv_all_free(srv.engine)


def test_exception_in_a_step_fails_only_the_requests_in_it(env):
    store = fresh_store(env, "store_step")
    poison = 13

    with LiveServer(settings(env, store, max_num_seqs=1)) as srv:
        runner = srv.engine.core.runner
        run = runner.run
        fired = threading.Event()

        def flaky(seqs, *args, **kwargs):
            time.sleep(0.005)
            if not fired.is_set() and any(s.token_ids[0] == poison for s in seqs):
                fired.set()
                raise RuntimeError("injected step failure")
            return run(seqs, *args, **kwargs)

        runner.run = flaky
        results: dict[str, httpx.Response] = {}

        def call(key: str, prompt: list[int], max_tokens: int) -> None:
            body = dict(
                model=BASE, prompt=prompt, max_tokens=max_tokens, temperature=0, ignore_eos=True, logprobs=0
            )
            body["return_tokens_as_token_ids"] = True
            results[key] = httpx.post(f"{srv.url}/v1/completions", json=body, timeout=30)

        # max_num_seqs=1: "before" runs, "poisoned" waits behind it, "after" waits behind that.
        jobs = {"before": [3, 4, 5], "poisoned": [poison, 4, 5], "after": [6, 7, 8]}
        threads = []
        for i, (key, prompt) in enumerate(jobs.items()):
            threads.append(threading.Thread(target=call, args=(key, prompt, 30)))
            threads[-1].start()
            wait_for(lambda i=i: srv.engine.stats().num_running + srv.engine.stats().num_waiting == i + 1)
        for t in threads:
            t.join()
        assert fired.is_set()
        assert results["poisoned"].status_code == 500
        assert "injected step failure" in results["poisoned"].json()["error"]["message"]
        base = peft_model(env["model_dir"])
        for key in ("before", "after"):
            assert results[key].status_code == 200, results[key].text
            got = token_ids_of(results[key].json()["choices"][0]["logprobs"])
            assert got == greedy_ids(base, jobs[key], 30)
        assert kv_all_free(srv.engine)
        assert httpx.get(f"{srv.url}/ready").status_code == 200


def _files(src: Path, weights_name: str = "adapter_model.safetensors", weights: bytes | None = None) -> dict:
    return {
        "adapter_config.json": ("adapter_config.json", (src / "adapter_config.json").read_bytes()),
        weights_name: (
            weights_name,
            weights if weights is not None else (src / "adapter_model.safetensors").read_bytes(),
        ),
    }


def _race_uploads(url: str, name: str, src: Path, racers: int) -> list[int]:
    barrier = threading.Barrier(racers)
    statuses: list[int] = []

    def upload() -> None:
        barrier.wait()
        r = httpx.post(f"{url}/v1/adapters", data={"name": name}, files=_files(src), timeout=30)
        statuses.append(r.status_code)

    threads = [threading.Thread(target=upload) for _ in range(racers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return statuses


def test_concurrent_uploads_of_one_name_exactly_one_wins(env):
    store = fresh_store(env, "store_race")
    with LiveServer(settings(env, store)) as srv:
        for attempt in range(3):
            assert sorted(_race_uploads(srv.url, f"race-{attempt}", env["good"], 4)) == [201, 409, 409, 409]
        assert sorted(p.name for p in store.iterdir()) == ["race-0", "race-1", "race-2"]


def test_failed_uploads_leave_the_store_byte_identical(env, tmp_path):
    store = fresh_store(env, "store_failed", {"good": env["good"]})
    other_base = make_tiny_model(tmp_path / "other_base", "llama", hidden_size=32, intermediate_size=64)
    wrong_shapes = make_peft_adapter(other_base, tmp_path / "wrong_shapes", r=8, seed=3)
    too_big_rank = make_peft_adapter(
        env["model_dir"], tmp_path / "rank32", r=32, target_modules=["q_proj"], seed=4
    )
    good = env["good"]
    weights = (good / "adapter_model.safetensors").read_bytes()
    limit = 64 * 1024

    cases = [
        ("bad-shapes", _files(wrong_shapes), 400),
        ("pickle", _files(good, "adapter_model.bin", b"\x80\x04\x95pickle"), 400),
        ("truncated", _files(good, weights=weights[: len(weights) // 2]), 400),
        ("garbage", _files(good, weights=b"\x00" * 100), 400),
        ("rank-too-big", _files(too_big_rank), 400),
        ("oversize", _files(good, weights=weights + b"\x00" * limit), 413),
        ("../evil", _files(good), 400),
        ("..", _files(good), 400),
        ("a/b", _files(good), 400),
        (".hidden", _files(good), 400),
        ("x" * 200, _files(good), 400),
        ("good", _files(good), 409),
        ("no-weights", {"adapter_config.json": _files(good)["adapter_config.json"]}, 400),
        ("bad-json", {**_files(good), "adapter_config.json": ("adapter_config.json", b"{not json")}, 400),
    ]
    with LiveServer(settings(env, store, max_adapter_bytes=limit, max_lora_rank=16)) as srv:
        before = tree_hash(store)
        for name, files, status in cases:
            r = httpx.post(f"{srv.url}/v1/adapters", data={"name": name}, files=files, timeout=30)
            assert r.status_code == status, (name, r.text)
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}
            assert tree_hash(store) == before, name
        # Over the body limit (upload limit + multipart allowance) is refused before parsing.
        huge = _files(good, weights=b"\x00" * (limit + 2 * 1024 * 1024))
        r = httpx.post(f"{srv.url}/v1/adapters", data={"name": "huge"}, files=huge, timeout=30)
        assert r.status_code == 413
        assert tree_hash(store) == before
        ok = httpx.post(f"{srv.url}/v1/adapters", data={"name": "fine"}, files=_files(good), timeout=30)
        assert ok.status_code == 201, ok.text


def test_shutdown_drains_running_requests(env):
    store = fresh_store(env, "store_drain")
    srv = LiveServer(settings(env, store)).start()
    slow_steps(srv.engine, 0.01)
    outcomes: list[tuple[int, list]] = []

    def stream() -> None:
        body = dict(
            model=BASE, prompt=[3, 1, 4, 1, 5], max_tokens=40, temperature=0, ignore_eos=True, stream=True
        )
        with httpx.stream("POST", f"{srv.url}/v1/completions", json=body, timeout=60) as r:
            lines = [line for line in r.iter_lines() if line]
            outcomes.append((r.status_code, lines))

    threads = [threading.Thread(target=stream) for _ in range(3)]
    for t in threads:
        t.start()
    wait_for(lambda: srv.engine.stats().num_running == 3, what="three running requests")
    engine = srv.engine
    stopper = threading.Thread(target=srv.stop)
    stopper.start()
    for t in threads:
        t.join(timeout=60)
    stopper.join(timeout=60)
    assert len(outcomes) == 3
    for status, lines in outcomes:
        assert status == 200
        assert lines[-1] == "data: [DONE]"
        chunks = [json.loads(line[6:]) for line in lines[:-1]]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert engine._thread is not None and not engine._thread.is_alive()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{srv.url}/health", timeout=2)


def test_no_chat_template_is_a_clear_400_and_readiness_gates_requests(env):
    store = fresh_store(env, "store_misc")
    release = threading.Event()
    from server.bootstrap import build_runtime

    runtime = build_runtime(settings(env, store))
    engine = runtime.engine
    start = engine.start

    async def gated_start() -> None:
        import asyncio

        while not release.is_set():
            await asyncio.sleep(0.01)
        await start()

    engine.start = gated_start
    srv = LiveServer(settings(env, store), runtime=runtime)
    srv._thread.start()
    try:
        wait_for(lambda: srv.server.started, what="uvicorn to start")
        assert httpx.get(f"{srv.url}/health").status_code == 200
        r = httpx.get(f"{srv.url}/ready")
        assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable"
        r = httpx.post(f"{srv.url}/v1/completions", json={"model": BASE, "prompt": "hi"})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        release.set()
        wait_for(lambda: httpx.get(f"{srv.url}/ready").status_code == 200, what="ready")
        r = httpx.post(
            f"{srv.url}/v1/chat/completions",
            json={"model": BASE, "messages": [{"role": "user", "content": "hi"}]},
        )
        assert r.status_code == 400 and "chat template" in r.json()["error"]["message"]
    finally:
        release.set()
        srv.stop()


def test_engine_boot_failure_fails_health(env, tmp_path):
    store = fresh_store(env, "store_boot")
    srv = LiveServer(settings(env, store, model=tmp_path))  # an empty directory: no model there
    srv._thread.start()
    try:
        wait_for(lambda: srv.state.boot_error is not None and srv.server.started, what="the boot to fail")
        health = httpx.get(f"{srv.url}/health")
        assert health.status_code == 503 and "failed to start" in health.json()["error"]["message"]
        assert httpx.get(f"{srv.url}/ready").status_code == 503
    finally:
        srv.stop()
