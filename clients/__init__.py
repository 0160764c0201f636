"""Client side of loraplex: Python clients (sync/async), the CLI and the load generator."""

from clients.client import AsyncLoraplexClient, LoraplexClient
from clients.errors import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    InternalServerError,
    LoraplexError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    RateLimitError,
    ServiceUnavailableError,
    StreamError,
    UnprocessableEntityError,
)
from clients.types import AdapterInfo, ChatCompletion, Completion, MergeResult, ModelInfo, StreamChunk, Usage

__all__ = [
    "APIConnectionError",
    "APIStatusError",
    "APITimeoutError",
    "AdapterInfo",
    "AsyncLoraplexClient",
    "AuthenticationError",
    "BadRequestError",
    "ChatCompletion",
    "Completion",
    "ConflictError",
    "InternalServerError",
    "LoraplexClient",
    "LoraplexError",
    "MergeResult",
    "ModelInfo",
    "NotFoundError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "RateLimitError",
    "ServiceUnavailableError",
    "StreamChunk",
    "StreamError",
    "UnprocessableEntityError",
    "Usage",
]
