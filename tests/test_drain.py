"""SIGTERM drains a real server process cleanly (issue 14, point 3).

``/ready`` turns 503 at once while the server still listens, new requests get 503, a request that fits
in ``--drain-timeout`` finishes normally, and the ones still running at the deadline end properly: a
stream with an OpenAI-style error event and ``data: [DONE]`` (a complete chunked body), a
non-streaming request with a 503 error body. Then the process exits, with no cancellation traceback.
"""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import pytest

from tests.model_factory import make_tiny_model
from tests.server_process import ServerProcess

DRAIN_S = 1.5


@pytest.fixture(scope="module")
def long_context_model(tmp_path_factory):
    """The tiny model with room for streams far longer than the drain timeout."""
    return make_tiny_model(tmp_path_factory.mktemp("long_ctx"), "llama", max_position_embeddings=8192)


def _body(max_tokens: int, stream: bool) -> dict:
    return dict(model="tiny", prompt=[5, 6, 7], max_tokens=max_tokens, temperature=0, ignore_eos=True,
                stream=stream)  # fmt: skip


def _stream(url: str, max_tokens: int, out: dict, first_chunk: threading.Event) -> None:
    try:
        with httpx.stream("POST", f"{url}/v1/completions", json=_body(max_tokens, True), timeout=60) as r:
            out["status"] = r.status_code
            lines = []
            for line in r.iter_lines():  # raises RemoteProtocolError on a cut chunked body
                if line:
                    lines.append(line)
                    first_chunk.set()
            out["lines"], out["ended_at"] = lines, time.monotonic()
    except Exception as exc:  # recorded, asserted on below
        out["error"] = repr(exc)
        first_chunk.set()


def _post(url: str, max_tokens: int, out: dict) -> None:
    try:
        out["response"] = httpx.post(f"{url}/v1/completions", json=_body(max_tokens, False), timeout=60)
    except Exception as exc:
        out["error"] = repr(exc)


def test_sigterm_drains_then_ends_every_request_cleanly(long_context_model, tmp_path):
    args = ["--model", str(long_context_model), "--served-model-name", "tiny", "--device", "cpu",
            "--adapter-store", str(tmp_path / "store"), "--num-kv-blocks", "2048",
            "--drain-timeout", str(DRAIN_S), "--log-level", "info"]  # fmt: skip
    srv = ServerProcess(args, tmp_path / "server.log").start()
    try:
        long_stream, long_plain, short_stream = {}, {}, {}
        streaming, short_started = threading.Event(), threading.Event()
        threads = [
            threading.Thread(target=_stream, args=(srv.url, 6000, long_stream, streaming)),
            threading.Thread(target=_post, args=(srv.url, 6000, long_plain)),
        ]
        for t in threads:
            t.start()
        assert streaming.wait(30), long_stream
        short = threading.Thread(target=_stream, args=(srv.url, 24, short_stream, short_started))
        short.start()
        assert short_started.wait(30), short_stream
        sigterm_at = time.monotonic()
        srv.signal(signal.SIGTERM)
        while httpx.get(f"{srv.url}/ready", timeout=5).status_code == 200:
            assert time.monotonic() - sigterm_at < 2, "/ready did not turn 503"
        ready_503_after = time.monotonic() - sigterm_at
        refused = httpx.post(f"{srv.url}/v1/completions", json=_body(4, False), timeout=10)
        assert refused.status_code == 503 and refused.json()["error"]["type"] == "service_unavailable"
        assert httpx.get(f"{srv.url}/health", timeout=5).status_code == 200  # draining is still alive
        for t in [*threads, short]:
            t.join(timeout=60)
        exit_code = srv.wait(timeout=30)
        exited_after = time.monotonic() - sigterm_at
    finally:
        srv.kill()
    log = srv.log()

    assert short_stream.get("status") == 200 and "error" not in short_stream, short_stream
    assert short_stream["lines"][-1] == "data: [DONE]"
    assert json.loads(short_stream["lines"][-2][6:])["choices"][0]["finish_reason"] == "length"

    assert "error" not in long_stream, long_stream  # the chunked body was complete
    assert long_stream["status"] == 200 and long_stream["lines"][-1] == "data: [DONE]"
    final = json.loads(long_stream["lines"][-2][6:])
    assert set(final["error"]) == {"message", "type", "param", "code"}
    assert final["error"]["code"] == 503 and "shutting down" in final["error"]["message"]
    assert len(long_stream["lines"]) > 3  # tokens really streamed before the cut
    stream_ended_after = long_stream["ended_at"] - sigterm_at

    assert "error" not in long_plain, long_plain
    r = long_plain["response"]
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert "shutting down" in r.json()["error"]["message"]

    assert ready_503_after < 0.5, ready_503_after
    assert DRAIN_S - 0.1 < stream_ended_after < DRAIN_S + 2, stream_ended_after
    assert exited_after < DRAIN_S + 5, exited_after
    assert exit_code in (0, -signal.SIGTERM)
    for bad in ("Traceback", "CancelledError", "Cancel ", "ERROR"):
        assert bad not in log, log
    assert "2 request(s) ended at the deadline" in log
    print(f"drain: /ready 503 after {ready_503_after * 1000:.0f} ms, cut stream ended after "
          f"{stream_ended_after:.2f} s (drain {DRAIN_S} s), process exited after {exited_after:.2f} s")  # fmt: skip
