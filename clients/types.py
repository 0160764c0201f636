"""Typed views of the server's JSON answers.

Each dataclass keeps the fields a caller uses plus ``raw`` (the whole JSON object), so a field the server
adds later is reachable without a client release, and parsing never fails on an unknown key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar


def _opt_int(value: Any) -> int | None:
    return int(value) if isinstance(value, (int, float)) else None


def _ids(data: dict[str, Any]) -> dict[str, str]:
    """``id`` and ``model`` of a generation answer or stream chunk, as constructor keywords."""
    return {"id": str(data.get("id", "")), "model": str(data.get("model", ""))}


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Usage | None:
        if not data:
            return None
        prompt = int(data.get("prompt_tokens") or 0)
        completion = int(data.get("completion_tokens") or 0)
        return cls(prompt, completion, int(data.get("total_tokens") or prompt + completion))


@dataclass
class CompletionChoice:
    index: int
    text: str
    finish_reason: str | None
    logprobs: Any = None


@dataclass
class ChatMessage:
    role: str
    content: str

    def to_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


@dataclass
class ChatChoice:
    index: int
    message: ChatMessage
    finish_reason: str | None


ChoiceT = TypeVar("ChoiceT")
_G = TypeVar("_G", bound="_Generated[Any]")


@dataclass
class _Generated(Generic[ChoiceT]):
    """What a completion and a chat completion answer share; they differ only in their choices."""

    id: str
    model: str
    choices: list[ChoiceT]
    usage: Usage | None
    created: int | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls: type[_G], data: dict[str, Any]) -> _G:
        choices = [cls._choice(i, c) for i, c in enumerate(data.get("choices") or [])]
        return cls(
            **_ids(data),
            choices=choices,
            usage=Usage.from_dict(data.get("usage")),
            created=_opt_int(data.get("created")),
            raw=data,
        )

    @staticmethod
    def _choice(index: int, data: dict[str, Any]) -> ChoiceT:
        """One choice of the subclass's kind; ``index`` is its position, for servers that leave it out."""
        raise NotImplementedError


@dataclass
class Completion(_Generated[CompletionChoice]):
    """``POST /v1/completions`` without streaming."""

    @property
    def text(self) -> str:
        """Text of the first choice, the common single-prompt case."""
        return self.choices[0].text if self.choices else ""

    @staticmethod
    def _choice(index: int, data: dict[str, Any]) -> CompletionChoice:
        return CompletionChoice(
            index=int(data.get("index", index)),
            text=data.get("text") or "",
            finish_reason=data.get("finish_reason"),
            logprobs=data.get("logprobs"),
        )


@dataclass
class ChatCompletion(_Generated[ChatChoice]):
    """``POST /v1/chat/completions`` without streaming."""

    @property
    def text(self) -> str:
        return self.choices[0].message.content if self.choices else ""

    @staticmethod
    def _choice(index: int, data: dict[str, Any]) -> ChatChoice:
        msg = data.get("message") or {}
        message = ChatMessage(msg.get("role") or "assistant", msg.get("content") or "")
        return ChatChoice(
            index=int(data.get("index", index)), message=message, finish_reason=data.get("finish_reason")
        )


@dataclass
class StreamChunk:
    """One SSE event of a streamed completion or chat completion, flattened to what callers need.

    ``text`` is the new text of choice ``index`` (``choices[i].text`` for completions,
    ``choices[i].delta.content`` for chat). The final usage-only chunk (``stream_options.include_usage``)
    has ``usage`` set and ``index`` None.
    """

    id: str
    model: str
    text: str
    index: int | None
    finish_reason: str | None
    usage: Usage | None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StreamChunk:
        choices = data.get("choices") or []
        text, index, finish = "", None, None
        if choices:
            c = choices[0]
            index = int(c.get("index", 0))
            finish = c.get("finish_reason")
            delta = c.get("delta")
            text = (delta.get("content") if isinstance(delta, dict) else c.get("text")) or ""
        return cls(
            **_ids(data),
            text=text,
            index=index,
            finish_reason=finish,
            usage=Usage.from_dict(data.get("usage")),
            raw=data,
        )


@dataclass
class ModelInfo:
    """An entry of ``GET /v1/models``: the base model or a servable adapter (``parent`` = base)."""

    id: str
    owned_by: str | None = None
    parent: str | None = None
    root: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelInfo:
        return cls(str(data.get("id", "")), data.get("owned_by"), data.get("parent"), data.get("root"), data)


@dataclass
class AdapterInfo:
    """An adapter as ``/v1/adapters`` describes it; fields the server leaves out stay None."""

    name: str
    rank: int | None = None
    alpha: float | None = None
    target_modules: list[str] | None = None
    base_model: str | None = None  # the served base model it applies to
    source: str | None = None  # "store" (uploaded) or "path" (vLLM-style load_lora_adapter)
    resident: bool | None = None  # currently in a device slot
    size_bytes: int | None = None
    digest: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdapterInfo:
        config = data.get("config") if isinstance(data.get("config"), dict) else {}
        alpha = data.get("alpha", config.get("lora_alpha"))
        targets = data.get("target_modules")
        resident = data.get("resident")
        return cls(
            name=str(data.get("name") or data.get("id") or ""),
            rank=_opt_int(data.get("rank", config.get("r"))),
            alpha=float(alpha) if isinstance(alpha, (int, float)) else None,
            target_modules=list(targets) if isinstance(targets, (list, tuple)) else None,
            base_model=data.get("parent") or data.get("base_model"),
            source=data.get("source"),
            resident=resident if isinstance(resident, bool) else None,
            size_bytes=_opt_int(data.get("size_bytes")),
            digest=data.get("digest"),
            raw=data,
        )


@dataclass
class MergeResult:
    """Answer of ``POST /v1/adapters/{name}/merge``: where the standalone merged checkpoint was written."""

    name: str
    path: str | None
    digest: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, name: str, data: dict[str, Any]) -> MergeResult:
        path = data.get("path")
        return cls(str(data.get("id") or name), str(path) if path else None, data.get("digest"), raw=data)
