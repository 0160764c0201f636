"""What the sync and async clients share besides :mod:`clients.protocol`: connection options, model
discovery and how transport failures surface."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import httpx

from clients.errors import APIConnectionError, APITimeoutError
from clients.types import ModelInfo

DEFAULT_BASE_URL = "http://127.0.0.1:8000"


def base_model_of(models: list[ModelInfo]) -> str:
    """The base model in a /v1/models listing: the entry without a parent."""
    for m in models:
        if not m.parent:
            return m.id
    if models:
        return models[0].id
    raise APIConnectionError("server lists no models")


@contextmanager
def transport_errors(what: str, failed: str = "failed") -> Iterator[None]:
    """Re-raise httpx's transport failures inside the block as the client's own exceptions.

    A plain (not async) context manager, so the async client wraps its awaits in it just the same.
    """
    try:
        yield
    except httpx.TimeoutException as exc:
        raise APITimeoutError(f"{what} timed out: {exc}") from exc
    except httpx.TransportError as exc:
        raise APIConnectionError(f"{what} {failed}: {exc}") from exc


class ClientOptions:
    """Connection options both clients share; ``admin_key`` defaults to ``api_key``."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        admin_key: str | None,
        timeout: float | httpx.Timeout,
        model: str | None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.admin_key = admin_key or api_key
        self.timeout = timeout
        self.model = model
