"""What the sync and async clients share: connection options and response decoding."""

from __future__ import annotations

import json
from typing import Any

import httpx

from clients.errors import APIConnectionError, error_from_response
from clients.types import ModelInfo

DEFAULT_BASE_URL = "http://127.0.0.1:8000"


def auth_headers(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


def parse_json(response: httpx.Response) -> Any:
    """The JSON body of a successful response ({"text": ...} for plain-text answers); raises on 4xx/5xx."""
    if response.status_code >= 400:
        raise error_from_response(response)
    if not response.content:
        return {}
    try:
        return response.json()
    except json.JSONDecodeError:
        return {"text": response.text}


def base_model_of(models: list[ModelInfo]) -> str:
    """The base model in a /v1/models listing: the entry without a parent."""
    for m in models:
        if not m.parent:
            return m.id
    if models:
        return models[0].id
    raise APIConnectionError("server lists no models")


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
