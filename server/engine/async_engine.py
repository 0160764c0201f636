"""The asyncio face of the engine: submit, stream, abort.

One engine thread owns the device and loops over ``LLMEngine.step``; the event loop only validates
requests, hands them over through a command queue and receives outputs through
``loop.call_soon_threadsafe``. Nothing on the event loop ever waits on the model. Building the engine
from settings is ``server.bootstrap``'s job; adapter operations are the adapter service's.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import torch

from server.engine.adapter_slots import AdapterHandle
from server.engine.llm_engine import LLMEngine
from server.engine.sequence import Sequence
from server.engine.types import (
    EngineStats,
    EngineStoppedError,
    ErrorKind,
    FinishReason,
    InvalidRequestError,
    QueueFullError,
    RequestOutput,
    SamplingParams,
    check_context_length,
)
from server.engine.watchdog import StepWatchdog

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServedModel:
    """What clients address and what their requests are checked against."""

    name: str
    tokenizer: object  # a transformers PreTrainedTokenizerBase
    max_model_len: int
    vocab_size: int


def shutdown_output(request_id: str) -> RequestOutput:
    """The last output of a request still running when the shutdown drain deadline passes."""
    return RequestOutput(
        request_id=request_id,
        new_token_ids=[],
        new_text="",
        finished=True,
        finish_reason=FinishReason.ERROR,
        error="the server is shutting down and this request did not finish within the drain timeout",
        error_kind=ErrorKind.SHUTTING_DOWN,
    )


class AsyncEngine:
    def __init__(
        self, core: LLMEngine, served: ServedModel, max_queue_len: int, step_timeout_s: float = 0.0
    ) -> None:
        self.core = core
        self.served = served
        self.max_queue_len = max_queue_len
        self.watchdog = StepWatchdog(step_timeout_s)
        self.ready = False
        self._accepting = True
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._streams: dict[str, asyncio.Queue] = {}
        self._stats = core.stats()

    # --- lifecycle --------------------------------------------------------------------------
    async def start(self) -> None:
        """Starts the engine thread and runs one tiny request through it, so the first user request
        does not pay for lazy initialisation."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run_loop, name="loraplex-engine", daemon=True)
        self._thread.start()
        warmup = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
        async for _ in await self.add_request([self.served.tokenizer.bos_token_id or 0], warmup):
            pass
        self.watchdog.armed = True
        self.ready = True

    async def drain(self, timeout: float) -> int:
        """Stops admitting (``ready`` is False at once); running requests get ``timeout`` seconds, then
        each one left ends with a SHUTTING_DOWN error, put on its stream here on the event loop (so a
        stuck engine thread cannot delay it) while the engine aborts it. Returns how many were cut."""
        self._accepting = False
        self.ready = False
        deadline = time.monotonic() + timeout
        while self._streams and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        cut = list(self._streams.items())
        for request_id, stream in cut:
            stream.put_nowait(shutdown_output(request_id))
            self.abort(request_id)
        return len(cut)

    async def shutdown(self, drain_timeout: float = 30.0) -> None:
        """Drains (see :meth:`drain`), then stops the engine thread."""
        await self.drain(drain_timeout)
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10.0)

    # --- requests ---------------------------------------------------------------------------
    async def add_request(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        adapter: AdapterHandle | None = None,
        request_id: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Validates and queues a request; the returned iterator yields its output increments."""
        if not self._accepting:
            raise EngineStoppedError("server is shutting down")
        self._validate(prompt_ids, params)
        if self._stats.num_waiting + self._commands.qsize() >= self.max_queue_len:
            raise QueueFullError(f"request queue is full ({self.max_queue_len} waiting)")
        request_id = request_id or uuid.uuid4().hex
        if request_id in self._streams:
            raise InvalidRequestError(f"duplicate request id {request_id!r}")
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = stream
        self._commands.put(("add", Sequence(request_id, prompt_ids, params, adapter)))
        self._wake.set()
        return self._iterate(request_id, stream)

    async def _iterate(self, request_id: str, stream: asyncio.Queue) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while not finished:
                out: RequestOutput = await stream.get()
                finished = out.finished
                yield out
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))
        self._wake.set()

    def _validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        vocab = self.served.vocab_size
        if any(not 0 <= t < vocab for t in prompt_ids):
            raise InvalidRequestError(f"prompt token ids must be in [0, {vocab})", "prompt")
        for name in ("logit_bias", "stop_token_ids"):
            if any(not 0 <= t < vocab for t in getattr(params, name)):
                raise InvalidRequestError(f"{name} token ids must be in [0, {vocab})", name)
        check_context_length(self.served.max_model_len, [len(prompt_ids)], params.max_tokens)

    def stats(self) -> EngineStats:
        """The latest snapshot the engine thread published."""
        return self._stats

    # --- the engine thread ------------------------------------------------------------------
    def _run_loop(self) -> None:
        torch.set_grad_enabled(False)
        while not self._stop.is_set():
            self._drain_commands()
            if not self.core.has_work():
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            self.watchdog.step_started()
            try:
                results = self.core.step()
            except Exception:  # a bug in scheduling itself: keep the server alive
                log.exception("engine step crashed")
                results = []
            finally:
                self.watchdog.step_finished()
            self._publish([out for _, out in results])

    def _drain_commands(self) -> None:
        aborted: list[RequestOutput] = []
        while True:
            try:
                kind, payload = self._commands.get_nowait()
            except queue.Empty:
                break
            if kind == "add":
                self.core.add(payload)
            elif kind == "abort":
                out = self.core.abort(payload)
                if out is not None:
                    aborted.append(out)
        self._publish(aborted)

    def _publish(self, outputs: list[RequestOutput]) -> None:
        self._stats = self.core.stats()
        if outputs and self._loop is not None:
            self._loop.call_soon_threadsafe(self._deliver, outputs)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is not None:
                stream.put_nowait(out)
