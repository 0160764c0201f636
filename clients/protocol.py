"""The HTTP shape of every call, with no I/O: bodies, paths and upload files.

The sync and async clients differ only in how they send; keeping what they send here means the two can
never drift apart, and the request bodies can be checked without a server.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import quote

UPLOAD_FILES = ("adapter_config.json", "adapter_model.safetensors")


@dataclass
class Sampling:
    """Generation knobs shared by completions and chat; None means "server default".

    ``extra`` is sent as-is, for server extensions this client does not name (vLLM's ``min_tokens``, ...).
    """

    max_tokens: int | None = 16
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None  # loraplex/vLLM extension: generate exactly max_tokens
    logprobs: int | bool | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, **kwargs: Any) -> Sampling:
        """Named knobs from keyword arguments; unknown keywords go to ``extra`` (sent verbatim)."""
        known = {f.name for f in fields(cls)} - {"extra"}
        extra = dict(kwargs.pop("extra", None) or {})
        extra.update({k: kwargs.pop(k) for k in list(kwargs) if k not in known})
        return cls(**kwargs, extra=extra)

    def to_body(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        out = {k: v for k, v in out.items() if v is not None}
        out.update(self.extra)
        return out


def _common(
    model: str, sampling: Sampling, stream: bool, adapters: dict[str, float] | None, include_usage: bool
) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, **sampling.to_body()}
    if adapters:
        body["adapters"] = {str(k): float(v) for k, v in adapters.items()}
    if stream:
        body["stream"] = True
        if include_usage:
            body["stream_options"] = {"include_usage": True}
    return body


def completion_body(
    model: str,
    prompt: str | list[int],
    sampling: Sampling,
    *,
    stream: bool = False,
    adapters: dict[str, float] | None = None,
    include_usage: bool = True,
) -> dict[str, Any]:
    """Body of ``POST /v1/completions``; ``adapters`` asks for a weighted composition."""
    return {**_common(model, sampling, stream, adapters, include_usage), "prompt": prompt}


def chat_body(
    model: str,
    messages: list[dict[str, str]],
    sampling: Sampling,
    *,
    stream: bool = False,
    adapters: dict[str, float] | None = None,
    include_usage: bool = True,
) -> dict[str, Any]:
    """Body of ``POST /v1/chat/completions``."""
    return {**_common(model, sampling, stream, adapters, include_usage), "messages": messages}


def adapter_path(name: str, suffix: str = "") -> str:
    """``/v1/adapters/{name}[/suffix]`` with the name percent-encoded (names are validated server-side)."""
    return f"/v1/adapters/{quote(name, safe='')}" + (f"/{suffix}" if suffix else "")


def read_upload(directory: str | Path) -> list[tuple[str, tuple[str, bytes, str]]]:
    """The multipart files of an adapter upload, read from a PEFT output directory.

    Read into memory rather than streamed so the same list serves the sync and async transports; the
    server caps uploads far below what would make this a problem.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"adapter directory not found: {directory}")
    files = []
    for fname in UPLOAD_FILES:
        path = directory / fname
        if not path.is_file():
            raise FileNotFoundError(f"{directory} is not a PEFT adapter directory: missing {fname}")
        mime = "application/json" if fname.endswith(".json") else "application/octet-stream"
        files.append((fname, (fname, path.read_bytes(), mime)))
    return files


def listing(data: Any, key: str = "data") -> list[dict[str, Any]]:
    """Entries of a list answer: ``{"data": [...]}``, ``{"adapters": [...]}`` or a bare JSON list."""
    if isinstance(data, list):
        return [d for d in data if isinstance(d, dict)]
    if isinstance(data, dict):
        for k in (key, "adapters", "data"):
            if isinstance(data.get(k), list):
                return [d for d in data[k] if isinstance(d, dict)]
    return []


def unwrap_adapter(data: Any, name: str) -> dict[str, Any]:
    """One adapter object, whether returned bare or wrapped as ``{"adapter": {...}}``."""
    if isinstance(data, dict):
        inner = data.get("adapter")
        if isinstance(inner, dict):
            return inner
        return data if data.get("name") or data.get("id") else {**data, "name": name}
    return {"name": name}
