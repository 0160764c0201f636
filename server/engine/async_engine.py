"""The asyncio face of the engine.

One engine thread owns the device and loops over ``LLMEngine.step``; the event loop only validates
requests, hands them over through a command queue and receives outputs through
``loop.call_soon_threadsafe``. Nothing on the event loop ever waits on the model.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import torch

from server.config import Settings
from server.engine.block_manager import BlockManager
from server.engine.llm_engine import EngineLimits, LLMEngine, eos_ids_of
from server.engine.model_runner import ModelRunner
from server.engine.sampler import Sampler
from server.engine.scheduler import Scheduler
from server.engine.sequence import Sequence
from server.engine.types import (
    AdapterNotFoundError,
    AdapterRef,
    EngineError,
    EngineStats,
    InvalidRequestError,
    QueueFullError,
    RequestOutput,
    SamplingParams,
)
from server.model.loader import geometry_of, load_model, load_tokenizer

log = logging.getLogger(__name__)


class AsyncEngine:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.device = settings.resolved_device()
        self.dtype = settings.resolved_dtype()
        torch.manual_seed(settings.seed)
        self.tokenizer = load_tokenizer(settings.model)
        self.model = load_model(settings.model, self.device, self.dtype)
        self.geometry = geometry_of(self.model.config)
        self.model_name = settings.served_model_name or Path(settings.model).resolve().name
        self.adapters, self.base_spec, lora_hook = self._build_lora()

        block_size = settings.block_size
        per_block = ModelRunner.kv_bytes_per_block(self.geometry, block_size, self.dtype)
        num_blocks = settings.num_kv_blocks or max(2, int(settings.kv_cache_memory_gb * 2**30 // per_block))
        self.max_model_len = min(
            settings.max_model_len or self.geometry.max_position_embeddings, num_blocks * block_size
        )
        runner = ModelRunner(
            self.model, self.geometry, num_blocks, block_size, self.device, self.dtype, lora_hook
        )
        scheduler = Scheduler(
            BlockManager(num_blocks, block_size),
            settings.max_num_seqs,
            settings.max_num_batched_tokens,
            adapter_gate=self.adapters.gate() if self.adapters is not None else None,
        )
        self.engine = LLMEngine(
            runner,
            scheduler,
            Sampler(self.device, settings.seed),
            self.tokenizer,
            EngineLimits(self.max_model_len, eos_ids_of(self.model, self.tokenizer)),
            adapters=self.adapters,
        )
        self.ready = False
        self._accepting = True
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._streams: dict[str, asyncio.Queue] = {}
        self._stats = EngineStats(max_loras=settings.max_loras if self.adapters is not None else 0)

    def _build_lora(self):
        """Wraps the targetable linears with LoRA slot buffers and builds the adapter manager."""
        from server.lora.setup import build_lora

        return build_lora(self.model, self.settings, self.device, self.dtype)

    # --- lifecycle --------------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run_loop, name="loraplex-engine", daemon=True)
        self._thread.start()
        warmup = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
        async for _ in await self.add_request([self.tokenizer.bos_token_id or 0], warmup):
            pass
        self.ready = True

    async def shutdown(self, drain_timeout: float = 30.0) -> None:
        """Stops admitting, lets running requests finish (up to the timeout), then stops the thread."""
        self._accepting = False
        self.ready = False
        deadline = time.monotonic() + drain_timeout
        while self._streams and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for request_id in list(self._streams):
            self.abort(request_id)
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10.0)

    # --- requests ---------------------------------------------------------------------------
    async def add_request(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        adapter: AdapterRef | None = None,
        request_id: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Validates and queues a request; the returned iterator yields its output increments."""
        if not self._accepting:
            raise EngineError("server is shutting down", status=503, type="service_unavailable")
        self._validate(prompt_ids, params)
        adapter = self._resolve_adapter(adapter)
        if self._stats.num_waiting + self._commands.qsize() >= self.settings.max_queue_len:
            raise QueueFullError(f"request queue is full ({self.settings.max_queue_len} waiting)")
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
        if not prompt_ids:
            raise InvalidRequestError("prompt must contain at least one token")
        vocab = self.geometry.vocab_size
        if any(not 0 <= t < vocab for t in prompt_ids):
            raise InvalidRequestError(f"prompt token ids must be in [0, {vocab})")
        total = len(prompt_ids) + params.max_tokens
        if total > self.max_model_len:
            raise InvalidRequestError(
                f"this model's maximum context length is {self.max_model_len} tokens, but the request "
                f"asks for {total} ({len(prompt_ids)} in the prompt + {params.max_tokens} max_tokens)"
            )

    def _resolve_adapter(self, adapter: AdapterRef | None) -> AdapterRef | None:
        if adapter is None or adapter.key is None:
            return None
        if adapter.name is not None and adapter.name == self.settings.merged_adapter:
            return None  # already folded into the base weights: zero LoRA cost
        if self.adapters is None:
            raise AdapterNotFoundError(f"adapter '{adapter.key}' not found: LoRA is disabled")
        names = list(adapter.weights) if adapter.weights else [adapter.name]
        for name in names:
            if not self.adapters.exists(name):
                raise AdapterNotFoundError(f"The model `{name}` does not exist.")
        self.adapters.prefetch(adapter)
        return adapter

    def stats(self) -> EngineStats:
        return self._stats

    # --- adapter operations -----------------------------------------------------------------
    async def load_adapter(self, name: str, path: Path | None = None, inplace: bool = False) -> None:
        """Parses and validates an adapter into the host cache (vLLM's load_lora_adapter).

        A new ``path`` is validated before it is registered, so a bad path never replaces the
        adapter already served under ``name``.
        """
        from server.lora.adapter import load_peft_adapter

        if self.adapters is None:
            raise InvalidRequestError("LoRA is disabled on this server")
        if path is not None:
            max_rank = self.settings.max_lora_rank
            await asyncio.to_thread(load_peft_adapter, Path(path), name, self.base_spec, max_rank)
            self.adapters.register_path(name, Path(path))
        await asyncio.to_thread(self.adapters.load_now, name, inplace)

    async def unload_adapter(self, name: str) -> None:
        if self.adapters is None or not self.adapters.exists(name):
            raise AdapterNotFoundError(f"adapter '{name}' not found")
        await asyncio.to_thread(self.adapters.unload, name)

    async def merge_adapter(self, name: str, out_dir: Path) -> Path:
        from server.lora.merge import export_merged

        if self.adapters is None or not self.adapters.exists(name):
            raise AdapterNotFoundError(f"adapter '{name}' not found")
        adapter_dir = self.adapters.path_of(name)
        await asyncio.to_thread(export_merged, self.settings.model, adapter_dir, out_dir)
        return out_dir

    # --- the engine thread ------------------------------------------------------------------
    def _run_loop(self) -> None:
        torch.set_grad_enabled(False)
        while not self._stop.is_set():
            self._drain_commands()
            if not self.engine.has_work():
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            try:
                results = self.engine.step()
            except Exception:  # a bug outside the model call: keep the server alive
                log.exception("engine step crashed")
                results = []
            self._publish([out for _, out in results])

    def _drain_commands(self) -> None:
        aborted: list[RequestOutput] = []
        while True:
            try:
                kind, payload = self._commands.get_nowait()
            except queue.Empty:
                break
            if kind == "add":
                self.engine.add(payload)
            elif kind == "abort":
                out = self.engine.abort(payload)
                if out is not None:
                    aborted.append(out)
        self._publish(aborted)

    def _publish(self, outputs: list[RequestOutput]) -> None:
        self._stats = self.engine.stats()
        if outputs and self._loop is not None:
            self._loop.call_soon_threadsafe(self._deliver, outputs)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is not None:
                stream.put_nowait(out)
