"""``AsyncLoraplexClient``: the asyncio twin of :class:`clients.client.LoraplexClient`.

Same methods, awaited, executing the same :mod:`clients.protocol` descriptions over ``httpx.AsyncClient``;
``stream_complete``/``stream_chat`` are async iterators (wrap them in ``contextlib.aclosing`` when breaking
out early, so the connection is released at once).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, TypeVar

import httpx

from clients import protocol
from clients.common import DEFAULT_BASE_URL, ClientOptions, base_model_of, transport_errors
from clients.errors import APIConnectionError, error_from_response
from clients.protocol import Call, Messages, Request
from clients.sse import ChunkDecoder
from clients.types import AdapterInfo, ChatCompletion, Completion, MergeResult, ModelInfo, StreamChunk

T = TypeVar("T")


class AsyncLoraplexClient:
    """asyncio client with the same methods as :class:`LoraplexClient`, awaited; streams are async iterators."""

    def __init__(self, base_url: str = DEFAULT_BASE_URL, *, api_key: str | None = None,
                 admin_key: str | None = None, timeout: float | httpx.Timeout = 120.0,
                 model: str | None = None, max_connections: int = 256,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:  # fmt: skip
        self.options = ClientOptions(base_url, api_key, admin_key, timeout, model)
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        self._http = httpx.AsyncClient(
            base_url=self.options.base_url, timeout=timeout, limits=limits, transport=transport
        )

    async def __aenter__(self) -> AsyncLoraplexClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # --- transport: executes protocol descriptions ----------------------------------------------
    async def _send(self, call: Call[T]) -> T:
        with transport_errors(f"{call.method} {call.path}"):
            response = await self._http.request(**call.send_args(self.options))
        return call.read(response)

    async def _stream(self, request: Request) -> AsyncIterator[StreamChunk]:
        chunks = ChunkDecoder()
        with transport_errors(f"stream {request.path}", "broke"):
            async with self._http.stream(**request.send_args(self.options)) as resp:
                if resp.status_code >= 400:
                    await resp.aread()
                    raise error_from_response(resp)
                async for line in resp.aiter_lines():
                    for chunk in chunks.feed(line):
                        yield chunk
                    if chunks.done:
                        return
                for chunk in chunks.end():
                    yield chunk

    async def _probe(self, path: str) -> bool:
        try:
            return await self._send(protocol.probe(path))
        except APIConnectionError:
            return False

    async def base_model(self) -> str:
        if not self.options.model:
            self.options.model = base_model_of(await self.models())
        return self.options.model

    async def _model(self, model: str | None) -> str:
        return model or await self.base_model()

    # --- generation ---------------------------------------------------------------------------
    async def complete(self, prompt: str | list[int], model: str | None = None, *,
                       adapters: dict[str, float] | None = None, **sampling: Any) -> Completion:  # fmt: skip
        generation = protocol.completion(await self._model(model), prompt, adapters, sampling)
        return await self._send(generation.call())

    async def stream_complete(self, prompt: str | list[int], model: str | None = None, *,
                              adapters: dict[str, float] | None = None, include_usage: bool = True,
                              **sampling: Any) -> AsyncIterator[StreamChunk]:  # fmt: skip
        """Async iterator of chunks; wrap in ``contextlib.aclosing`` when breaking out early."""
        generation = protocol.completion(await self._model(model), prompt, adapters, sampling)
        async for chunk in self._stream(generation.stream(include_usage)):
            yield chunk

    async def chat(self, messages: Messages, model: str | None = None, *,
                   adapters: dict[str, float] | None = None, **sampling: Any) -> ChatCompletion:  # fmt: skip
        generation = protocol.chat(await self._model(model), messages, adapters, sampling)
        return await self._send(generation.call())

    async def stream_chat(self, messages: Messages, model: str | None = None, *,
                          adapters: dict[str, float] | None = None, include_usage: bool = True,
                          **sampling: Any) -> AsyncIterator[StreamChunk]:  # fmt: skip
        generation = protocol.chat(await self._model(model), messages, adapters, sampling)
        async for chunk in self._stream(generation.stream(include_usage)):
            yield chunk

    # --- models and adapters ------------------------------------------------------------------
    async def models(self) -> list[ModelInfo]:
        return await self._send(protocol.models())

    async def upload_adapter(self, directory: str | Path, name: str) -> AdapterInfo:
        return await self._send(protocol.upload_adapter(directory, name))

    async def list_adapters(self) -> list[AdapterInfo]:
        return await self._send(protocol.list_adapters())

    async def get_adapter(self, name: str) -> AdapterInfo:
        return await self._send(protocol.get_adapter(name))

    async def delete_adapter(self, name: str) -> None:
        await self._send(protocol.delete_adapter(name))

    async def merge_adapter(self, name: str) -> MergeResult:
        return await self._send(protocol.merge_adapter(name))

    async def load_lora_adapter(self, name: str, path: str | Path) -> None:
        await self._send(protocol.load_lora_adapter(name, path))

    async def unload_lora_adapter(self, name: str) -> None:
        await self._send(protocol.unload_lora_adapter(name))

    # --- operations ---------------------------------------------------------------------------
    async def health(self) -> bool:
        return await self._probe("/health")

    async def ready(self) -> bool:
        return await self._probe("/ready")

    async def metrics(self) -> str:
        return await self._send(protocol.metrics())
