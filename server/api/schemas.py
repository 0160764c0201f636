"""Request bodies of the HTTP API (pydantic), in OpenAI's and vLLM's field names.

Unknown fields are ignored, as OpenAI clients send many optional ones. Fields we accept but cannot
honour (penalties, top logprobs, echo) are rejected with a clear 400 instead of being silently
dropped. Responses are plain dicts built by the routes in OpenAI's shapes.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_CHOICES = 64  # n per request: bounds how many engine requests one HTTP request can queue
MAX_STOP = 16

TokenId = Annotated[int, Field(ge=0, le=2**31 - 1)]
Seed = Annotated[int, Field(ge=-(2**63), le=2**64 - 1)]
StopStr = Annotated[str, Field(max_length=256)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class StreamOptions(_Body):
    include_usage: bool = False


class _SamplingFields(_Body):
    """Fields shared by completions and chat completions."""

    model: str = Field(..., description="The base model's served name, or an adapter name.")
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1, description="0 or -1: off (vLLM extension).")
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    seed: Seed | None = None
    stop: StopStr | list[StopStr] | None = Field(None, description="Stop string(s); not included in output.")
    stop_token_ids: list[TokenId] | None = Field(None, max_length=MAX_STOP)
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    adapters: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = Field(
        None,
        description="Weighted composition of adapters, name -> weight (loraplex extension).",
        max_length=64,
    )
    user: str | None = None
    return_tokens_as_token_ids: bool = Field(
        False, description="vLLM extension: logprobs name tokens as 'token_id:<id>' instead of text."
    )

    @field_validator("stop")
    @classmethod
    def _stop_count(cls, value):
        if isinstance(value, list) and len(value) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings")
        return value

    @model_validator(mode="after")
    def _unsupported(self):
        if self.presence_penalty or self.frequency_penalty:
            raise ValueError("presence_penalty and frequency_penalty are not supported; leave them at 0")
        if self.adapters is not None and not self.adapters:
            raise ValueError("adapters must name at least one adapter")
        return self

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        items = [self.stop] if isinstance(self.stop, str) else self.stop
        return [s for s in items if s]


class CompletionRequest(_SamplingFields):
    prompt: (
        Annotated[str, Field(min_length=1)]
        | Annotated[list[TokenId], Field(min_length=1)]
        | Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1, max_length=MAX_CHOICES)]
        | Annotated[
            list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1, max_length=MAX_CHOICES)
        ]
    ) = Field(..., description="A string, a token list, or a list of either (one choice set each).")
    max_tokens: int | None = Field(16, ge=1, description="Default 16, as OpenAI's completions.")
    logprobs: int | None = Field(None, ge=0, le=20, description="0: logprob of each sampled token.")
    echo: bool = False
    suffix: str | None = None

    @model_validator(mode="after")
    def _completion_unsupported(self):
        if self.logprobs:
            raise ValueError(
                "top logprobs are not supported; use logprobs=0 for the sampled tokens' logprobs"
            )
        if self.echo:
            raise ValueError("echo is not supported")
        if self.suffix:
            raise ValueError("suffix is not supported")
        return self

    def prompt_list(self) -> list[str] | list[list[int]]:
        """The prompt as a list of prompts (each a string or a token list)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [p]
        return list(p)


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Annotated[str, Field(min_length=1, max_length=64)]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="Default: the rest of the context.")
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    @model_validator(mode="after")
    def _chat_unsupported(self):
        if self.top_logprobs:
            raise ValueError(
                "top_logprobs is not supported; logprobs=true returns the sampled tokens' logprobs"
            )
        return self

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class LoadLoRAAdapterRequest(_Body):
    """vLLM's ``/v1/load_lora_adapter`` body."""

    lora_name: str
    lora_path: str
    load_inplace: bool = False


class UnloadLoRAAdapterRequest(_Body):
    """vLLM's ``/v1/unload_lora_adapter`` body (``lora_int_id`` accepted and ignored, as in vLLM)."""

    lora_name: str
    lora_int_id: int | None = None
