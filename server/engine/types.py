"""Plain data exchanged between the HTTP layer and the engine.

Kept free of torch so the API layer (and its tests) can build requests without touching the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class FinishReason(str, Enum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the context length
    ABORT = "abort"  # cancelled by the client
    ERROR = "error"  # the step or the adapter failed; see RequestOutput.error


@dataclass
class SamplingParams:
    """Per-request sampling; temperature == 0 means greedy."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: bool = False  # return the logprob of each sampled token

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class AdapterRef:
    """Which LoRA weights a request runs with.

    ``name`` is one adapter from the store; ``weights`` (name -> weight) asks for a weighted
    composition, served as one virtual adapter. Neither set means the base model.
    """

    name: str | None = None
    weights: dict[str, float] | None = None

    @property
    def key(self) -> str | None:
        """Identity of the (possibly virtual) adapter, used for slots and caching."""
        if self.weights:
            parts = ",".join(f"{n}:{w!r}" for n, w in sorted(self.weights.items()))
            return f"compose({parts})"
        return self.name


@dataclass
class RequestOutput:
    """One increment of a request's output, streamed back from the engine."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool = False
    finish_reason: FinishReason | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    error: str | None = None
    error_status: int | None = None  # HTTP status the API should use for an error
    logprobs: list[float] | None = None


class EngineError(Exception):
    """Raised to the API with an HTTP status and an OpenAI error type."""

    status: int = 500
    type: str = "internal_error"

    def __init__(self, message: str, *, status: int | None = None, type: str | None = None):
        super().__init__(message)
        if status is not None:
            self.status = status
        if type is not None:
            self.type = type


class QueueFullError(EngineError):
    status = 429
    type = "rate_limit_exceeded"


class AdapterNotFoundError(EngineError):
    status = 404
    type = "not_found_error"


class InvalidRequestError(EngineError):
    status = 400
    type = "invalid_request_error"


@dataclass
class EngineStats:
    """Snapshot for /metrics and routing (the vLLM-compatible gauges read these)."""

    num_waiting: int = 0
    num_running: int = 0
    kv_cache_usage: float = 0.0  # 0..1
    running_adapters: list[str] = field(default_factory=list)
    waiting_adapters: list[str] = field(default_factory=list)
    resident_adapters: list[str] = field(default_factory=list)
    max_loras: int = 0
