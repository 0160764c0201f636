"""The runner's timing, concurrency cap, error accounting and deadline, against an in-process fake server.

The fake is an ``httpx.MockTransport`` that streams SSE chunks with known delays, so TTFT and
inter-token gaps have known true values; the real server is exercised in test_loadgen_live.py.
"""

from __future__ import annotations

import asyncio
import json
import socket

import httpx
import pytest

from clients.client import AsyncLoraplexClient
from clients.loadgen.prompts import PromptFactory
from clients.loadgen.runner import RunConfig, run_schedule
from clients.loadgen.workload import PlannedRequest


class FakeServer:
    """Streams ``max_tokens`` one-character chunks, ``gap`` s apart, after ``first`` s; counts concurrency."""

    def __init__(self, first: float = 0.05, gap: float = 0.02, fail: dict[str, int] | None = None):
        self.first, self.gap, self.fail = first, gap, fail or {}
        self.in_flight = self.max_in_flight = 0
        self.bodies: list[dict] = []

    async def handler(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        self.bodies.append(body)
        if body["model"] in self.fail:
            status = self.fail[body["model"]]
            error = {"error": {"message": "nope", "type": "x", "param": None, "code": status}}
            return httpx.Response(status, json=error, headers={"Retry-After": "1"})
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=self._events(body))

    async def _events(self, body):
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        done = False
        try:
            n = body["max_tokens"]
            await asyncio.sleep(self.first)
            for i in range(n):
                if i:
                    await asyncio.sleep(self.gap)
                choice = {"index": 0, "text": "x", "finish_reason": "length" if i == n - 1 else None}
                yield f"data: {json.dumps({'id': 'c', 'model': body['model'], 'choices': [choice]})}\n\n".encode()
            usage = {"prompt_tokens": len(body["prompt"].split()), "completion_tokens": n, "total_tokens": 0}
            yield f"data: {json.dumps({'id': 'c', 'model': body['model'], 'choices': [], 'usage': usage})}\n\n".encode()
            # The client stops reading at [DONE] and httpx does not close this generator, so count it
            # out of flight before the last event rather than in the finally alone.
            done = True
            self.in_flight -= 1
            yield b"data: [DONE]\n\n"
        finally:
            if not done:
                self.in_flight -= 1


def _run(server: FakeServer, schedule, concurrency=64, drain=10.0):
    async def go():
        client = AsyncLoraplexClient(
            "http://fake", transport=httpx.MockTransport(server.handler), model="base"
        )
        async with client:
            return await run_schedule(
                client, schedule, PromptFactory(0), RunConfig("base", concurrency, drain)
            )

    return asyncio.run(go())


def test_records_ttft_itl_tokens_and_request_body():
    server = FakeServer(first=0.05, gap=0.02)
    schedule = [PlannedRequest(i, 0.05 * i, "lora-a" if i % 2 else None, 6, 5) for i in range(6)]
    records, wall = _run(server, schedule)
    assert all(r.ok for r in records), [r.error for r in records]
    for rec, planned in zip(records, schedule, strict=True):
        assert rec.text == "xxxxx" and rec.output_tokens == 5 and rec.prompt_tokens == 6
        assert rec.finish_reason == "length"
        assert 0.045 <= rec.ttft < 0.25
        assert len(rec.inter_token) == 4 and all(0.015 <= g < 0.2 for g in rec.inter_token)
        assert rec.e2e >= rec.ttft + 4 * 0.015
        assert rec.sent_at >= planned.at - 1e-3
    assert wall >= 0.25 + 0.05 + 0.08
    body = server.bodies[1]
    assert body["model"] == "lora-a" and server.bodies[0]["model"] == "base"
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["temperature"] == 0.0 and body["ignore_eos"] is True and body["max_tokens"] == 5


def test_concurrency_cap_queues_on_the_client_and_counts_the_wait():
    server = FakeServer(first=0.1, gap=0.0)
    schedule = [PlannedRequest(i, 0.0, None, 3, 1) for i in range(6)]
    records, _ = _run(server, schedule, concurrency=2)
    assert server.max_in_flight == 2
    ttfts = sorted(r.ttft for r in records)
    # Three waves of two: latency is measured from the scheduled arrival, so the wait shows.
    assert ttfts[0] < 0.2 and ttfts[-1] >= 0.3


def test_errors_are_counted_by_status_and_connection_failures_by_kind():
    server = FakeServer(fail={"bad": 404, "busy": 429})
    schedule = [PlannedRequest(i, 0.0, name, 3, 2) for i, name in enumerate(["bad", "busy", "busy", None])]
    records, _ = _run(server, schedule)
    assert [r.error_kind for r in records] == ["404", "429", "429", None]
    assert "nope" in records[0].error

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    async def refused():
        async with AsyncLoraplexClient(f"http://127.0.0.1:{port}", model="base", timeout=5) as client:
            return await run_schedule(client, schedule[:2], PromptFactory(0), RunConfig("base"))

    records, _ = asyncio.run(refused())
    assert [r.error_kind for r in records] == ["connection", "connection"]


def test_stragglers_are_cancelled_at_the_deadline():
    server = FakeServer(first=30.0)
    records, wall = _run(server, [PlannedRequest(0, 0.0, None, 3, 2)], drain=0.3)
    assert records[0].error_kind == "deadline" and not records[0].ok
    assert wall < 5.0


@pytest.mark.parametrize("bad", [dict(concurrency=0), dict(drain_timeout_s=0)])
def test_run_config_validation(bad):
    with pytest.raises(ValueError):
        RunConfig("base", **bad)
