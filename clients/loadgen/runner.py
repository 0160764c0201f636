"""Drives a server with a schedule, open loop: requests go out at their planned times whatever the server does.

Each request streams (``/v1/completions`` with ``stream_options.include_usage``), so the first text chunk
gives TTFT and the gaps between chunks give inter-token latency. A concurrency cap bounds the open
connections; requests over the cap wait on the client and that wait counts in their latency (see
:mod:`clients.loadgen.record`). The run is bounded: after the last arrival, stragglers get
``drain_timeout_s`` and are then cancelled and counted as ``deadline`` errors.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from clients.client import AsyncLoraplexClient
from clients.errors import APIConnectionError, APITimeoutError, LoraplexError, StreamError
from clients.loadgen.prompts import PromptFactory
from clients.loadgen.record import RequestRecord
from clients.loadgen.workload import PlannedRequest


@dataclass
class RunConfig:
    """How requests are sent (not which: that is the schedule)."""

    base_model: str
    concurrency: int = 64
    drain_timeout_s: float = 60.0
    temperature: float = 0.0
    ignore_eos: bool = True  # so output lengths follow the schedule, not the model's EOS
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        if self.drain_timeout_s <= 0:
            raise ValueError("drain_timeout_s must be > 0")


def error_kind(exc: BaseException) -> str:
    """The key an error is counted under: the HTTP status, or what failed on the client side."""
    if isinstance(exc, APITimeoutError):
        return "timeout"
    if isinstance(exc, StreamError):
        return f"stream-{exc.status}" if exc.status else "stream"
    if isinstance(exc, APIConnectionError):
        return "connection"
    if isinstance(exc, LoraplexError) and exc.status is not None:
        return str(exc.status)
    return type(exc).__name__


async def _send(
    client: AsyncLoraplexClient,
    planned: PlannedRequest,
    rec: RequestRecord,
    config: RunConfig,
    clock: Callable[[], float],
) -> None:
    rec.sent_at = clock()
    first_chunk: float | None = None
    try:
        stream = client.stream_complete(
            rec.prompt,
            planned.adapter or config.base_model,
            max_tokens=planned.output_len,
            temperature=config.temperature,
            ignore_eos=config.ignore_eos or None,
            extra=config.extra,
        )
        async for chunk in stream:
            now = clock()
            if chunk.index is not None and first_chunk is None:
                first_chunk = now
            if chunk.text:
                if rec.first_token_at is None:
                    rec.first_token_at = now
                rec.chunk_times.append(now)
                rec.text += chunk.text
            if chunk.finish_reason:
                rec.finish_reason = chunk.finish_reason
            if chunk.usage is not None:
                rec.prompt_tokens = chunk.usage.prompt_tokens
                rec.output_tokens = chunk.usage.completion_tokens
        rec.finished_at = clock()
        if rec.first_token_at is None:
            rec.first_token_at = first_chunk  # tokens that decoded to no text yet still arrived
        if not rec.output_tokens:
            rec.output_tokens = len(rec.chunk_times)
    except LoraplexError as exc:
        rec.finished_at = clock()
        rec.error_kind, rec.error = error_kind(exc), str(exc)


async def run_schedule(
    client: AsyncLoraplexClient,
    schedule: list[PlannedRequest],
    prompts: PromptFactory,
    config: RunConfig,
    on_done: Callable[[RequestRecord], None] | None = None,
) -> tuple[list[RequestRecord], float]:
    """Send every planned request at its time; return the records (schedule order) and the wall time."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()

    def clock() -> float:
        return loop.time() - t0

    gate = asyncio.Semaphore(config.concurrency)
    records = [
        RequestRecord(p.index, p.adapter, p.at, prompt=prompts.prompt(p.index, p.input_len)) for p in schedule
    ]

    async def one(planned: PlannedRequest, rec: RequestRecord) -> None:
        async with gate:
            await _send(client, planned, rec, config, clock)
        if on_done is not None:
            on_done(rec)

    tasks: list[asyncio.Task] = []
    for planned, rec in zip(schedule, records, strict=True):
        delay = planned.at - clock()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(planned, rec)))

    if tasks:
        _, pending = await asyncio.wait(tasks, timeout=config.drain_timeout_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for rec in records:
            if rec.finished_at is None and rec.error_kind is None:
                rec.error_kind, rec.error = (
                    "deadline",
                    f"unfinished {config.drain_timeout_s}s after the last arrival",
                )
                if on_done is not None:
                    on_done(rec)
    return records, clock()
