"""Plain data exchanged between the HTTP layer and the engine.

Kept free of torch so the API layer (and its tests) can build requests without touching the model.
Errors say *what* went wrong (a kind, an exception class); which HTTP status that is, is the API's
business (``server/api/errors.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from server.engine.structured import Grammar

MAX_TOP_LOGPROBS = 20


class FinishReason(str, Enum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the context length
    ABORT = "abort"  # cancelled by the client
    ERROR = "error"  # the step or the adapter failed; see RequestOutput.error


class ErrorKind(str, Enum):
    """Why a request ended with ``FinishReason.ERROR``."""

    ADAPTER_UNAVAILABLE = "adapter_unavailable"  # its adapter could not be loaded: the request's fault
    INTERNAL = "internal"  # the engine step failed (a kernel error, a NaN guard, a bug)
    OUT_OF_MEMORY = "out_of_memory"  # the device ran out of memory in the step: retrying may succeed
    SHUTTING_DOWN = "shutting_down"  # still running when the shutdown drain deadline passed


@dataclass
class SamplingParams:
    """Per-request sampling; temperature == 0 means greedy.

    Processing order, as vLLM's: the grammar mask, ``min_tokens`` and ``logit_bias``, then the
    penalties, then greedy argmax or temperature -> ``min_p`` -> ``top_k`` / ``top_p`` -> sample.
    Returned logprobs are the model's own (before any of that), as vLLM's default ``raw_logprobs``.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0  # drop tokens less likely than min_p * the most likely one's probability
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0  # EOS, stop_token_ids and stop strings cannot end the output before this
    presence_penalty: float = 0.0  # subtracted from the logit of every token already in the output
    frequency_penalty: float = 0.0  # times how often the token is in the output, subtracted
    repetition_penalty: float = 1.0  # divides (>0) / multiplies (<0) logits of prompt and output tokens
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    logprobs: bool = False  # return the logprob of each sampled token
    top_logprobs: int = 0  # ... and of the most likely alternatives at each position (needs logprobs)
    prompt_logprobs: bool = False  # also the prompt tokens' logprobs (and their top_logprobs)
    grammar: Grammar | None = None  # a compiled output constraint (server/engine/structured.py)

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if not 0 <= self.min_p <= 1:
            raise ValueError("min_p must be in [0, 1]")
        if self.repetition_penalty <= 0:
            raise ValueError("repetition_penalty must be > 0")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError("min_tokens must be in [0, max_tokens]")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)


TopLogprobs = list[tuple[int, float]]  # (token id, logprob), most likely first


@dataclass
class RequestOutput:
    """One increment of a request's output, streamed back from the engine."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool = False
    finish_reason: FinishReason | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache
    num_output_tokens: int = 0
    error: str | None = None
    error_kind: ErrorKind | None = None
    logprobs: list[float] | None = None  # of each new token, when the request asked
    top_logprobs: list[TopLogprobs] | None = None  # alternatives at each new token, when asked
    # With the first increment, when asked: the logprob of each prompt token but the first given the
    # tokens before it (and its alternatives); the first prompt token has none.
    prompt_logprobs: list[float] | None = None
    prompt_top_logprobs: list[TopLogprobs] | None = None


class EngineError(Exception):
    """A request the engine refuses; the subclass says why."""


class InvalidRequestError(EngineError, ValueError):
    """The request itself is wrong; ``param`` names the offending field when there is one."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class QueueFullError(EngineError):
    """Too many requests are waiting: retry later."""


class EngineStoppedError(EngineError):
    """The engine is draining or stopped and admits nothing new."""


def check_context_length(max_model_len: int, prompt_lens: list[int], max_tokens: int | None) -> int:
    """The request's ``max_tokens`` (default: the rest of the context), or InvalidRequestError.

    The one definition of the context check: the API calls it to fill in the default before
    queueing, the engine calls it again on what it is handed.
    """
    if not prompt_lens or min(prompt_lens) == 0:
        raise InvalidRequestError("prompt is empty (0 tokens after tokenization)", "prompt")
    longest = max(prompt_lens)
    if longest >= max_model_len:
        raise InvalidRequestError(
            f"this model's maximum context length is {max_model_len} tokens, but the prompt has "
            f"{longest} tokens, which leaves no room for output",
            "prompt",
        )
    if max_tokens is None:
        return max_model_len - longest
    if longest + max_tokens > max_model_len:
        raise InvalidRequestError(
            f"this model's maximum context length is {max_model_len} tokens, but the request asks for "
            f"{longest + max_tokens} ({longest} in the prompt + {max_tokens} max_tokens)",
            "max_tokens",
        )
    return max_tokens


@dataclass
class EngineStats:
    """Snapshot for /metrics and routing (the vLLM-compatible gauges read these).

    Built by the engine thread after each step, so readers on other threads never see a half-updated
    scheduler.
    """

    num_waiting: int = 0
    num_running: int = 0
    kv_cache_usage: float = 0.0  # 0..1, blocks in use by requests
    kv_cache_cached_free: float = 0.0  # 0..1, blocks holding a cached prefix that no request uses
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache (lifetime)
    prefix_cache_hits: int = 0  # ... of which found cached
    running_adapters: list[str] = field(default_factory=list)
    waiting_adapters: list[str] = field(default_factory=list)
    resident_adapters: list[str] = field(default_factory=list)
    max_loras: int = 0
    num_steps: int = 0
    num_preemptions: int = 0
    last_batch_size: int = 0  # sequences in the latest step
    num_scheduled_seqs_total: int = 0
    num_batched_tokens_total: int = 0
    failed_steps: dict[str, int] = field(default_factory=dict)  # ErrorKind value -> steps that raised
