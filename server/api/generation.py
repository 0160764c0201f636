"""The engine requests behind one HTTP generation request, as one stream of events.

An OpenAI request fans out to ``len(prompts) * n`` engine requests ("choices"). Each choice's
output iterator is drained by its own pump task into one queue, so the completions and chat routes,
streaming or not, consume a single ordered event stream and share one cleanup path.

Cleanup never awaits: a streaming response is cancelled by Starlette's cancel scope when the client
goes away, and every ``await`` inside a cancelled scope raises again. So :meth:`RequestGroup.close`
only calls ``engine.abort`` for unfinished choices; the engine then finishes them, frees their KV
blocks and sends a final output, on which the pumps end by themselves.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import Request

from server.api.errors import STATUS_OF_ERROR_KIND, APIError
from server.engine.types import ErrorKind, RequestOutput, SamplingParams, TopLogprobs
from server.lora.ref import AdapterRef
from server.metrics import ServerMetrics

_DISCONNECT_POLL_S = 0.25
_SEED_MIN, _SEED_MAX = -(2**63), 2**64 - 1


class ClientDisconnected(Exception):
    """The client closed the connection while a non-streaming request was running."""


@dataclass
class GenerationJob:
    """What a route asks the engine for, after validation and tokenization."""

    prompts: list[list[int]]
    params: SamplingParams
    n: int
    adapter: AdapterRef | None
    adapter_labels: list[str]  # for the per-adapter request counter ('' = base model)


@dataclass
class TokenRun:
    """Consecutive tokens with their logprobs (None where a position has none: the first prompt token)."""

    token_ids: list[int]
    logprobs: list[float | None]
    top: list[TopLogprobs | None]

    @classmethod
    def of_output(cls, choice_ids: list[int], logprobs: list[float], top: list[TopLogprobs]) -> TokenRun:
        return cls(list(choice_ids), list(logprobs), list(top) or [[] for _ in choice_ids])

    @classmethod
    def of_prompt(cls, prompt_ids: list[int], logprobs: list[float], top: list[TopLogprobs]) -> TokenRun:
        return cls(list(prompt_ids), [None, *logprobs], [None, *top])

    def __add__(self, other: TokenRun) -> TokenRun:
        return TokenRun(
            self.token_ids + other.token_ids, self.logprobs + other.logprobs, self.top + other.top
        )


@dataclass
class Choice:
    """Accumulated output of one engine request."""

    index: int
    prompt_index: int
    request_id: str
    num_prompt_tokens: int
    num_cached_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[TopLogprobs] = field(default_factory=list)
    prompt_logprobs: list[float] = field(default_factory=list)
    prompt_top_logprobs: list[TopLogprobs] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None
    error: str | None = None
    error_kind: ErrorKind | None = None
    last_token_at: float | None = None

    def apply(self, out: RequestOutput) -> None:
        self.token_ids.extend(out.new_token_ids)
        self.num_cached_tokens = out.num_cached_tokens
        self.text += out.new_text
        if out.logprobs:
            self.logprobs.extend(out.logprobs)
            self.top_logprobs.extend(out.top_logprobs or [])
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
            self.prompt_top_logprobs = out.prompt_top_logprobs or []
        if out.finished:
            self.finished = True
            self.finish_reason = out.finish_reason.value if out.finish_reason is not None else None
            self.error, self.error_kind = out.error, out.error_kind

    def output_run(self) -> TokenRun:
        return TokenRun.of_output(self.token_ids, self.logprobs, self.top_logprobs)

    def prompt_run(self, prompt_ids: list[int]) -> TokenRun:
        return TokenRun.of_prompt(prompt_ids, self.prompt_logprobs, self.prompt_top_logprobs)


def seed_for(seed: int | None, i: int) -> int | None:
    """``seed + i`` for the i-th of n choices, kept inside the range torch generators accept."""
    if seed is None:
        return None
    value = seed + i
    if value > _SEED_MAX:
        value -= _SEED_MAX - _SEED_MIN + 1
    return value


class RequestGroup:
    """Opens, follows and (on early exit) aborts the engine requests of one HTTP request."""

    def __init__(self, engine, metrics: ServerMetrics, request_id: str) -> None:
        self.engine = engine
        self.metrics = metrics
        self.request_id = request_id
        self.started_at = time.monotonic()
        self.choices: list[Choice] = []
        self._queue: asyncio.Queue[tuple[Choice, RequestOutput]] = asyncio.Queue()
        self._pumps: list[asyncio.Task] = []
        self._checked_at = self.started_at  # last disconnect check

    async def open(self, job: GenerationJob) -> None:
        """Queues every choice; if one is refused (queue full, unknown adapter) the others are aborted."""
        try:
            for p_idx, prompt in enumerate(job.prompts):
                for i in range(job.n):
                    params = dataclasses.replace(job.params, seed=seed_for(job.params.seed, i))
                    index = len(self.choices)
                    rid = f"{self.request_id}-{index}"
                    stream = await self.engine.add_request(prompt, params, job.adapter, request_id=rid)
                    choice = Choice(
                        index=index, prompt_index=p_idx, request_id=rid, num_prompt_tokens=len(prompt)
                    )
                    self.choices.append(choice)
                    self._pumps.append(asyncio.create_task(self._pump(choice, stream)))
        except BaseException:
            self.close()
            raise
        for label in job.adapter_labels:
            self.metrics.count_adapter_request(label)
        self.metrics.prompt_tokens.inc(sum(c.num_prompt_tokens for c in self.choices))

    async def _pump(self, choice: Choice, stream: AsyncIterator[RequestOutput]) -> None:
        async for out in stream:
            await self._queue.put((choice, out))

    def close(self) -> None:
        """Aborts unfinished choices (synchronously; see the module docstring)."""
        for choice in self.choices:
            if not choice.finished:
                self.engine.abort(choice.request_id)
                choice.finished = True
                choice.finish_reason = "abort"
                self.metrics.finished.labels(finish_reason="abort").inc()

    @property
    def done(self) -> bool:
        return all(c.finished for c in self.choices)

    async def next_event(self, request: Request | None = None) -> tuple[Choice, RequestOutput]:
        """The next output increment of any choice; polls for a disconnect when ``request`` is given."""
        while True:
            if request is None:
                choice, out = await self._queue.get()
            else:
                now = time.monotonic()
                if now - self._checked_at >= _DISCONNECT_POLL_S:  # also while outputs keep coming
                    self._checked_at = now
                    if await request.is_disconnected():
                        raise ClientDisconnected
                try:
                    choice, out = await asyncio.wait_for(self._queue.get(), _DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    continue
            if choice.finished:  # aborted by close(); drop late increments
                continue
            self._record(choice, out)
            choice.apply(out)
            if choice.finished:
                self.metrics.finished.labels(finish_reason=choice.finish_reason or "unknown").inc()
            return choice, out

    def _record(self, choice: Choice, out: RequestOutput) -> None:
        if not out.new_token_ids:
            return
        now = time.monotonic()
        if choice.last_token_at is None:
            self.metrics.ttft_seconds.observe(now - self.started_at)
        else:
            self.metrics.itl_seconds.observe(now - choice.last_token_at)
        choice.last_token_at = now
        self.metrics.generation_tokens.inc(len(out.new_token_ids))

    async def prime(self, request: Request) -> list[tuple[Choice, RequestOutput]]:
        """Waits for the first increment, so a failure before the first token (the adapter did not
        load, the prefill step raised) is answered with a real HTTP status instead of an SSE error."""
        choice, out = await self.next_event(request)
        raise_if_failed(choice)
        return [(choice, out)]

    async def run_to_completion(self, request: Request) -> list[Choice]:
        """Non-streaming: all choices to the end; the first failed choice decides the error status."""
        while not self.done:
            choice, _ = await self.next_event(request)
            raise_if_failed(choice)
        return self.choices

    def usage(self) -> dict:
        """OpenAI counts each prompt once, however many choices (``n``) it was sampled for; its cached
        tokens are those of the prompt's first choice."""
        first = {c.prompt_index: c for c in reversed(self.choices)}.values()
        prompt = sum(c.num_prompt_tokens for c in first)
        completion = sum(len(c.token_ids) for c in self.choices)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(c.num_cached_tokens for c in first)},
        }


def raise_if_failed(choice: Choice) -> None:
    if choice.finished and choice.error is not None:
        status = STATUS_OF_ERROR_KIND.get(choice.error_kind, 500)
        headers = {"Retry-After": "1"} if status == 503 else None
        raise APIError(status, choice.error, headers=headers)
