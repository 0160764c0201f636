"""Python clients for a loraplex server: ``LoraplexClient`` (sync) here, ``AsyncLoraplexClient`` (asyncio)
in :mod:`clients.async_client` and re-exported.

Both execute what :mod:`clients.protocol` describes (one description per call, so the two cannot differ
in what they send or how they read answers) and raise :mod:`clients.errors` exceptions carrying the
server's status and message. Generation calls come in pairs: ``complete``/``stream_complete`` and
``chat``/``stream_chat``; the stream variants yield :class:`StreamChunk` as SSE events arrive, which is
what the load generator times for TTFT and inter-token latency.

``model`` is the base model's served name or an adapter name; left as None the client asks
``/v1/models`` once for the base model.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx

from clients import protocol
from clients.async_client import AsyncLoraplexClient
from clients.common import DEFAULT_BASE_URL, ClientOptions, base_model_of, transport_errors
from clients.errors import APIConnectionError, error_from_response
from clients.protocol import Call, Messages, Request
from clients.sse import ChunkDecoder
from clients.types import AdapterInfo, ChatCompletion, Completion, MergeResult, ModelInfo, StreamChunk

__all__ = ["DEFAULT_BASE_URL", "AsyncLoraplexClient", "LoraplexClient"]
T = TypeVar("T")


class LoraplexClient:
    """Blocking client. Use as a context manager or call :meth:`close`."""

    def __init__(self, base_url: str = DEFAULT_BASE_URL, *, api_key: str | None = None,
                 admin_key: str | None = None, timeout: float | httpx.Timeout = 120.0,
                 model: str | None = None, transport: httpx.BaseTransport | None = None) -> None:  # fmt: skip
        self.options = ClientOptions(base_url, api_key, admin_key, timeout, model)
        self._http = httpx.Client(base_url=self.options.base_url, timeout=timeout, transport=transport)

    def __enter__(self) -> LoraplexClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # --- transport: executes protocol descriptions ----------------------------------------------
    def _send(self, call: Call[T]) -> T:
        with transport_errors(f"{call.method} {call.path}"):
            response = self._http.request(**call.send_args(self.options))
        return call.read(response)

    def _stream(self, request: Request) -> Iterator[StreamChunk]:
        chunks = ChunkDecoder()
        send_args = request.send_args(self.options)
        with transport_errors(f"stream {request.path}", "broke"), self._http.stream(**send_args) as resp:
            if resp.status_code >= 400:
                resp.read()
                raise error_from_response(resp)
            for line in resp.iter_lines():
                yield from chunks.feed(line)
                if chunks.done:
                    return
            yield from chunks.end()

    def _probe(self, path: str) -> bool:
        try:
            return self._send(protocol.probe(path))
        except APIConnectionError:
            return False

    def base_model(self) -> str:
        """Served name of the base model (the ``model`` given at construction, else asked once)."""
        if not self.options.model:
            self.options.model = base_model_of(self.models())
        return self.options.model

    def _model(self, model: str | None) -> str:
        return model or self.base_model()

    # --- generation ---------------------------------------------------------------------------
    def complete(self, prompt: str | list[int], model: str | None = None, *,
                 adapters: dict[str, float] | None = None, **sampling: Any) -> Completion:  # fmt: skip
        """One completion; ``sampling``: :class:`Sampling` fields (max_tokens, temperature, ignore_eos, ...),
        any other keyword is sent in the body as given."""
        return self._send(protocol.completion(self._model(model), prompt, adapters, sampling).call())

    def stream_complete(self, prompt: str | list[int], model: str | None = None, *,
                        adapters: dict[str, float] | None = None, include_usage: bool = True,
                        **sampling: Any) -> Iterator[StreamChunk]:  # fmt: skip
        generation = protocol.completion(self._model(model), prompt, adapters, sampling)
        return self._stream(generation.stream(include_usage))

    def chat(self, messages: Messages, model: str | None = None, *,
             adapters: dict[str, float] | None = None, **sampling: Any) -> ChatCompletion:  # fmt: skip
        return self._send(protocol.chat(self._model(model), messages, adapters, sampling).call())

    def stream_chat(self, messages: Messages, model: str | None = None, *,
                    adapters: dict[str, float] | None = None, include_usage: bool = True,
                    **sampling: Any) -> Iterator[StreamChunk]:  # fmt: skip
        generation = protocol.chat(self._model(model), messages, adapters, sampling)
        return self._stream(generation.stream(include_usage))

    # --- models and adapters ------------------------------------------------------------------
    def models(self) -> list[ModelInfo]:
        return self._send(protocol.models())

    def upload_adapter(self, directory: str | Path, name: str) -> AdapterInfo:
        """Upload a PEFT output directory (adapter_config.json + adapter_model.safetensors) as ``name``."""
        return self._send(protocol.upload_adapter(directory, name))

    def list_adapters(self) -> list[AdapterInfo]:
        return self._send(protocol.list_adapters())

    def get_adapter(self, name: str) -> AdapterInfo:
        return self._send(protocol.get_adapter(name))

    def delete_adapter(self, name: str) -> None:
        self._send(protocol.delete_adapter(name))

    def merge_adapter(self, name: str) -> MergeResult:
        """Ask the server to export ``name`` merged into the base as a standalone HF checkpoint."""
        return self._send(protocol.merge_adapter(name))

    def load_lora_adapter(self, name: str, path: str | Path) -> None:
        """vLLM-compatible: register an adapter from a path the server may read (``allowed_lora_roots``)."""
        self._send(protocol.load_lora_adapter(name, path))

    def unload_lora_adapter(self, name: str) -> None:
        self._send(protocol.unload_lora_adapter(name))

    # --- operations ---------------------------------------------------------------------------
    def health(self) -> bool:
        return self._probe("/health")

    def ready(self) -> bool:
        return self._probe("/ready")

    def metrics(self) -> str:
        return self._send(protocol.metrics())
