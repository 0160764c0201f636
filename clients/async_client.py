"""``AsyncLoraplexClient``: the asyncio twin of :class:`clients.client.LoraplexClient`.

Same methods, awaited; ``stream_complete``/``stream_chat`` are async iterators (wrap them in
``contextlib.aclosing`` when breaking out early, so the connection is released at once).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

from clients import protocol
from clients.common import DEFAULT_BASE_URL, ClientOptions, auth_headers, base_model_of, parse_json
from clients.errors import APIConnectionError, APITimeoutError, error_from_response
from clients.protocol import Sampling
from clients.sse import SSEDecoder, decode_event
from clients.types import AdapterInfo, ChatCompletion, Completion, MergeResult, ModelInfo, StreamChunk

Messages = list[dict[str, str]]


class AsyncLoraplexClient:
    """asyncio client with the same methods as :class:`LoraplexClient`, awaited; streams are async iterators."""

    def __init__(
        self,
        base_url: str = DEFAULT_BASE_URL,
        *,
        api_key: str | None = None,
        admin_key: str | None = None,
        timeout: float | httpx.Timeout = 120.0,
        model: str | None = None,
        max_connections: int = 256,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
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

    async def _request(self, method: str, path: str, *, admin: bool = False, **kwargs: Any) -> httpx.Response:
        key = self.options.admin_key if admin else self.options.api_key
        try:
            return await self._http.request(method, path, headers=auth_headers(key), **kwargs)
        except httpx.TimeoutException as exc:
            raise APITimeoutError(f"{method} {path} timed out: {exc}") from exc
        except httpx.TransportError as exc:
            raise APIConnectionError(f"{method} {path} failed: {exc}") from exc

    async def _stream(self, path: str, body: dict[str, Any]) -> AsyncIterator[StreamChunk]:
        decoder = SSEDecoder()
        try:
            async with self._http.stream(
                "POST", path, json=body, headers=auth_headers(self.options.api_key)
            ) as resp:
                if resp.status_code >= 400:
                    await resp.aread()
                    raise error_from_response(resp)
                async for line in resp.aiter_lines():
                    data = decoder.feed(line)
                    if data is None:
                        continue
                    event = decode_event(data)
                    if event is None:
                        return
                    yield StreamChunk.from_dict(event)
                tail = decoder.flush()
                if tail is not None and (event := decode_event(tail)) is not None:
                    yield StreamChunk.from_dict(event)
        except httpx.TimeoutException as exc:
            raise APITimeoutError(f"stream {path} timed out: {exc}") from exc
        except httpx.TransportError as exc:
            raise APIConnectionError(f"stream {path} broke: {exc}") from exc

    async def base_model(self) -> str:
        if not self.options.model:
            self.options.model = base_model_of(await self.models())
        return self.options.model

    async def _model(self, model: str | None) -> str:
        return model or await self.base_model()

    async def complete(
        self,
        prompt: str | list[int],
        model: str | None = None,
        *,
        adapters: dict[str, float] | None = None,
        **sampling: Any,
    ) -> Completion:
        body = protocol.completion_body(
            await self._model(model), prompt, Sampling.of(**sampling), adapters=adapters
        )
        return Completion.from_dict(parse_json(await self._request("POST", "/v1/completions", json=body)))

    async def stream_complete(
        self,
        prompt: str | list[int],
        model: str | None = None,
        *,
        adapters: dict[str, float] | None = None,
        include_usage: bool = True,
        **sampling: Any,
    ) -> AsyncIterator[StreamChunk]:
        """Async iterator of chunks; wrap in ``contextlib.aclosing`` when breaking out early."""
        body = protocol.completion_body(
            await self._model(model),
            prompt,
            Sampling.of(**sampling),
            stream=True,
            adapters=adapters,
            include_usage=include_usage,
        )
        async for chunk in self._stream("/v1/completions", body):
            yield chunk

    async def chat(
        self,
        messages: Messages,
        model: str | None = None,
        *,
        adapters: dict[str, float] | None = None,
        **sampling: Any,
    ) -> ChatCompletion:
        body = protocol.chat_body(
            await self._model(model), messages, Sampling.of(**sampling), adapters=adapters
        )
        return ChatCompletion.from_dict(
            parse_json(await self._request("POST", "/v1/chat/completions", json=body))
        )

    async def stream_chat(
        self,
        messages: Messages,
        model: str | None = None,
        *,
        adapters: dict[str, float] | None = None,
        include_usage: bool = True,
        **sampling: Any,
    ) -> AsyncIterator[StreamChunk]:
        body = protocol.chat_body(
            await self._model(model),
            messages,
            Sampling.of(**sampling),
            stream=True,
            adapters=adapters,
            include_usage=include_usage,
        )
        async for chunk in self._stream("/v1/chat/completions", body):
            yield chunk

    async def models(self) -> list[ModelInfo]:
        data = parse_json(await self._request("GET", "/v1/models"))
        return [ModelInfo.from_dict(m) for m in protocol.listing(data)]

    async def upload_adapter(self, directory: str | Path, name: str) -> AdapterInfo:
        files = protocol.read_upload(directory)
        resp = await self._request("POST", "/v1/adapters", admin=True, data={"name": name}, files=files)
        return AdapterInfo.from_dict(protocol.unwrap_adapter(parse_json(resp), name))

    async def list_adapters(self) -> list[AdapterInfo]:
        data = parse_json(await self._request("GET", "/v1/adapters"))
        return [AdapterInfo.from_dict(a) for a in protocol.listing(data, "adapters")]

    async def get_adapter(self, name: str) -> AdapterInfo:
        data = parse_json(await self._request("GET", protocol.adapter_path(name)))
        return AdapterInfo.from_dict(protocol.unwrap_adapter(data, name))

    async def delete_adapter(self, name: str) -> None:
        parse_json(await self._request("DELETE", protocol.adapter_path(name), admin=True))

    async def merge_adapter(self, name: str) -> MergeResult:
        data = parse_json(await self._request("POST", protocol.adapter_path(name, "merge"), admin=True))
        return MergeResult.from_dict(name, data if isinstance(data, dict) else {})

    async def load_lora_adapter(self, name: str, path: str | Path) -> None:
        body = {"lora_name": name, "lora_path": str(path)}
        parse_json(await self._request("POST", "/v1/load_lora_adapter", admin=True, json=body))

    async def unload_lora_adapter(self, name: str) -> None:
        parse_json(
            await self._request("POST", "/v1/unload_lora_adapter", admin=True, json={"lora_name": name})
        )

    async def health(self) -> bool:
        try:
            return (await self._request("GET", "/health")).status_code == 200
        except APIConnectionError:
            return False

    async def ready(self) -> bool:
        try:
            return (await self._request("GET", "/ready")).status_code == 200
        except APIConnectionError:
            return False

    async def metrics(self) -> str:
        resp = await self._request("GET", "/metrics")
        if resp.status_code >= 400:
            raise error_from_response(resp)
        return resp.text
