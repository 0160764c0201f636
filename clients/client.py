"""Python clients for a loraplex server: ``LoraplexClient`` (sync) here, ``AsyncLoraplexClient`` (asyncio)
in :mod:`clients.async_client` and re-exported.

Both send exactly what :mod:`clients.protocol` builds and raise :mod:`clients.errors` exceptions carrying
the server's status and message. Generation calls come in pairs: ``complete``/``stream_complete`` and
``chat``/``stream_chat``; the stream variants yield :class:`StreamChunk` as SSE events arrive, which is
what the load generator times for TTFT and inter-token latency.

``model`` is the base model's served name or an adapter name; left as None the client asks
``/v1/models`` once for the base model.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from clients import protocol
from clients.async_client import AsyncLoraplexClient
from clients.common import DEFAULT_BASE_URL, ClientOptions, auth_headers, base_model_of, parse_json
from clients.errors import APIConnectionError, APITimeoutError, error_from_response
from clients.protocol import Sampling
from clients.sse import SSEDecoder, decode_event
from clients.types import AdapterInfo, ChatCompletion, Completion, MergeResult, ModelInfo, StreamChunk

__all__ = ["DEFAULT_BASE_URL", "AsyncLoraplexClient", "LoraplexClient"]
Messages = list[dict[str, str]]


class LoraplexClient:
    """Blocking client. Use as a context manager or call :meth:`close`."""

    def __init__(
        self,
        base_url: str = DEFAULT_BASE_URL,
        *,
        api_key: str | None = None,
        admin_key: str | None = None,
        timeout: float | httpx.Timeout = 120.0,
        model: str | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.options = ClientOptions(base_url, api_key, admin_key, timeout, model)
        self._http = httpx.Client(base_url=self.options.base_url, timeout=timeout, transport=transport)

    def __enter__(self) -> LoraplexClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # --- transport ----------------------------------------------------------------------------
    def _request(self, method: str, path: str, *, admin: bool = False, **kwargs: Any) -> httpx.Response:
        key = self.options.admin_key if admin else self.options.api_key
        try:
            return self._http.request(method, path, headers=auth_headers(key), **kwargs)
        except httpx.TimeoutException as exc:
            raise APITimeoutError(f"{method} {path} timed out: {exc}") from exc
        except httpx.TransportError as exc:
            raise APIConnectionError(f"{method} {path} failed: {exc}") from exc

    def _stream(self, path: str, body: dict[str, Any]) -> Iterator[StreamChunk]:
        decoder = SSEDecoder()
        try:
            with self._http.stream(
                "POST", path, json=body, headers=auth_headers(self.options.api_key)
            ) as resp:
                if resp.status_code >= 400:
                    resp.read()
                    raise error_from_response(resp)
                for line in resp.iter_lines():
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

    def base_model(self) -> str:
        """Served name of the base model (the ``model`` given at construction, else asked once)."""
        if not self.options.model:
            self.options.model = base_model_of(self.models())
        return self.options.model

    def _model(self, model: str | None) -> str:
        return model or self.base_model()

    # --- generation ---------------------------------------------------------------------------
    def complete(
        self,
        prompt: str | list[int],
        model: str | None = None,
        *,
        adapters: dict[str, float] | None = None,
        **sampling: Any,
    ) -> Completion:
        """One completion; ``sampling``: :class:`Sampling` fields (max_tokens, temperature, ignore_eos, ...),
        any other keyword is sent in the body as given."""
        body = protocol.completion_body(
            self._model(model), prompt, Sampling.of(**sampling), adapters=adapters
        )
        return Completion.from_dict(parse_json(self._request("POST", "/v1/completions", json=body)))

    def stream_complete(
        self,
        prompt: str | list[int],
        model: str | None = None,
        *,
        adapters: dict[str, float] | None = None,
        include_usage: bool = True,
        **sampling: Any,
    ) -> Iterator[StreamChunk]:
        body = protocol.completion_body(
            self._model(model),
            prompt,
            Sampling.of(**sampling),
            stream=True,
            adapters=adapters,
            include_usage=include_usage,
        )
        return self._stream("/v1/completions", body)

    def chat(
        self,
        messages: Messages,
        model: str | None = None,
        *,
        adapters: dict[str, float] | None = None,
        **sampling: Any,
    ) -> ChatCompletion:
        body = protocol.chat_body(self._model(model), messages, Sampling.of(**sampling), adapters=adapters)
        return ChatCompletion.from_dict(parse_json(self._request("POST", "/v1/chat/completions", json=body)))

    def stream_chat(
        self,
        messages: Messages,
        model: str | None = None,
        *,
        adapters: dict[str, float] | None = None,
        include_usage: bool = True,
        **sampling: Any,
    ) -> Iterator[StreamChunk]:
        body = protocol.chat_body(
            self._model(model),
            messages,
            Sampling.of(**sampling),
            stream=True,
            adapters=adapters,
            include_usage=include_usage,
        )
        return self._stream("/v1/chat/completions", body)

    # --- models and adapters ------------------------------------------------------------------
    def models(self) -> list[ModelInfo]:
        return [
            ModelInfo.from_dict(m) for m in protocol.listing(parse_json(self._request("GET", "/v1/models")))
        ]

    def upload_adapter(self, directory: str | Path, name: str) -> AdapterInfo:
        """Upload a PEFT output directory (adapter_config.json + adapter_model.safetensors) as ``name``."""
        files = protocol.read_upload(directory)
        resp = self._request("POST", "/v1/adapters", admin=True, data={"name": name}, files=files)
        return AdapterInfo.from_dict(protocol.unwrap_adapter(parse_json(resp), name))

    def list_adapters(self) -> list[AdapterInfo]:
        data = parse_json(self._request("GET", "/v1/adapters"))
        return [AdapterInfo.from_dict(a) for a in protocol.listing(data, "adapters")]

    def get_adapter(self, name: str) -> AdapterInfo:
        data = parse_json(self._request("GET", protocol.adapter_path(name)))
        return AdapterInfo.from_dict(protocol.unwrap_adapter(data, name))

    def delete_adapter(self, name: str) -> None:
        parse_json(self._request("DELETE", protocol.adapter_path(name), admin=True))

    def merge_adapter(self, name: str) -> MergeResult:
        """Ask the server to export ``name`` merged into the base as a standalone HF checkpoint."""
        data = parse_json(self._request("POST", protocol.adapter_path(name, "merge"), admin=True))
        return MergeResult.from_dict(name, data if isinstance(data, dict) else {})

    def load_lora_adapter(self, name: str, path: str | Path) -> None:
        """vLLM-compatible: register an adapter from a path the server may read (``allowed_lora_roots``)."""
        body = {"lora_name": name, "lora_path": str(path)}
        parse_json(self._request("POST", "/v1/load_lora_adapter", admin=True, json=body))

    def unload_lora_adapter(self, name: str) -> None:
        parse_json(self._request("POST", "/v1/unload_lora_adapter", admin=True, json={"lora_name": name}))

    # --- operations ---------------------------------------------------------------------------
    def health(self) -> bool:
        try:
            return self._request("GET", "/health").status_code == 200
        except APIConnectionError:
            return False

    def ready(self) -> bool:
        try:
            return self._request("GET", "/ready").status_code == 200
        except APIConnectionError:
            return False

    def metrics(self) -> str:
        resp = self._request("GET", "/metrics")
        if resp.status_code >= 400:
            raise error_from_response(resp)
        return resp.text
