"""The sans-IO core of the clients: every API call described once, as data, with no I/O.

Each endpoint is a function returning a :class:`Call` (method, path, which key, body, and how the read
response becomes the typed result) or, for a streamed generation, a :class:`Request` whose SSE lines
:class:`clients.sse.ChunkDecoder` turns into chunks. ``LoraplexClient`` and ``AsyncLoraplexClient`` only
execute these over ``httpx.Client`` / ``httpx.AsyncClient``, so the two can never drift apart, and what
is sent and how answers are read can be checked without a server (``httpx.Response`` is plain data).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Generic, TypeVar
from urllib.parse import quote

import httpx

from clients.common import ClientOptions
from clients.errors import error_from_response
from clients.types import AdapterInfo, ChatCompletion, Completion, MergeResult, ModelInfo

T = TypeVar("T")
Prompt = str | list[int]  # text, or token ids
Messages = list[dict[str, str]]
Weights = dict[str, float]  # adapter name -> weight of a composition
UploadFiles = list[tuple[str, tuple[str, bytes, str]]]

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


# --- what a call is -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Request:
    """What to send: ``admin`` calls go with the admin key, the rest with the API key."""

    method: str
    path: str
    admin: bool = False
    json: dict[str, Any] | None = None
    data: dict[str, str] | None = None
    files: UploadFiles | None = None

    def send_args(self, options: ClientOptions) -> dict[str, Any]:
        """Keyword arguments for ``request``/``stream`` of ``httpx.Client`` and ``httpx.AsyncClient``."""
        key = options.admin_key if self.admin else options.api_key
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return {
            "method": self.method,
            "url": self.path,
            "headers": headers,
            "json": self.json,
            "data": self.data,
            "files": self.files,
        }


@dataclass(frozen=True, kw_only=True)
class Call(Request, Generic[T]):
    """A request answered in one piece; ``read`` turns the read response into the result (or raises)."""

    read: Callable[[httpx.Response], T]


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


def _json(parse: Callable[[Any], T]) -> Callable[[httpx.Response], T]:
    """Reader of a JSON answer: raise for 4xx/5xx, else ``parse`` the decoded body."""
    return lambda response: parse(parse_json(response))


def _nothing(data: Any) -> None:
    """For calls whose answer only matters by its status."""


def _text(response: httpx.Response) -> str:
    if response.status_code >= 400:
        raise error_from_response(response)
    return response.text


def _is_200(response: httpx.Response) -> bool:
    return response.status_code == 200


# --- generation ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Generation(Generic[T]):
    """A completion or chat request, sent whole (:meth:`call`) or streamed (:meth:`stream`).

    ``common`` (model, sampling, composition) and ``payload`` (prompt or messages) stay apart so the
    stream flags land between them, keeping the body's key order the same either way.
    """

    path: str
    common: dict[str, Any]
    payload: dict[str, Any]
    parse: Callable[[dict[str, Any]], T]

    def call(self) -> Call[T]:
        return Call("POST", self.path, json={**self.common, **self.payload}, read=_json(self.parse))

    def stream(self, include_usage: bool = True) -> Request:
        """``stream_options.include_usage`` asks for a last chunk with the token counts."""
        usage = {"stream_options": {"include_usage": True}} if include_usage else {}
        return Request("POST", self.path, json={**self.common, "stream": True, **usage, **self.payload})


def _common(model: str, adapters: Weights | None, sampling: dict[str, Any]) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, **Sampling.of(**sampling).to_body()}
    if adapters:
        body["adapters"] = {str(k): float(v) for k, v in adapters.items()}
    return body


def completion(
    model: str, prompt: Prompt, adapters: Weights | None, sampling: dict[str, Any]
) -> Generation[Completion]:
    """``POST /v1/completions``; ``adapters`` asks for a weighted composition, ``sampling`` holds
    :class:`Sampling` fields and any other keyword, sent in the body as given."""
    common = _common(model, adapters, sampling)
    return Generation("/v1/completions", common, {"prompt": prompt}, Completion.from_dict)


def chat(
    model: str, messages: Messages, adapters: Weights | None, sampling: dict[str, Any]
) -> Generation[ChatCompletion]:
    """``POST /v1/chat/completions``; the arguments as for :func:`completion`."""
    common = _common(model, adapters, sampling)
    return Generation("/v1/chat/completions", common, {"messages": messages}, ChatCompletion.from_dict)


# --- models and adapters ------------------------------------------------------------------------
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


def _adapter(name: str) -> Callable[[httpx.Response], AdapterInfo]:
    """Reader of an answer about one adapter (``name`` fills in when the server leaves it out)."""

    def parse(data: Any) -> AdapterInfo:
        return AdapterInfo.from_dict(unwrap_adapter(data, name))

    return _json(parse)


def _models(data: Any) -> list[ModelInfo]:
    return [ModelInfo.from_dict(m) for m in listing(data)]


def _adapters(data: Any) -> list[AdapterInfo]:
    return [AdapterInfo.from_dict(a) for a in listing(data, "adapters")]


def adapter_path(name: str, suffix: str = "") -> str:
    """``/v1/adapters/{name}[/suffix]`` with the name percent-encoded (names are validated server-side)."""
    return f"/v1/adapters/{quote(name, safe='')}" + (f"/{suffix}" if suffix else "")


def read_upload(directory: str | Path) -> UploadFiles:
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


def models() -> Call[list[ModelInfo]]:
    return Call("GET", "/v1/models", read=_json(_models))


def upload_adapter(directory: str | Path, name: str) -> Call[AdapterInfo]:
    """The directory is read here, so a missing file fails before anything is sent."""
    files = read_upload(directory)
    return Call("POST", "/v1/adapters", admin=True, data={"name": name}, files=files, read=_adapter(name))


def list_adapters() -> Call[list[AdapterInfo]]:
    return Call("GET", "/v1/adapters", read=_json(_adapters))


def get_adapter(name: str) -> Call[AdapterInfo]:
    return Call("GET", adapter_path(name), read=_adapter(name))


def delete_adapter(name: str) -> Call[None]:
    return Call("DELETE", adapter_path(name), admin=True, read=_json(_nothing))


def merge_adapter(name: str) -> Call[MergeResult]:
    """Export ``name`` merged into the base as a standalone HF checkpoint (on the server)."""

    def parse(data: Any) -> MergeResult:
        return MergeResult.from_dict(name, data if isinstance(data, dict) else {})

    return Call("POST", adapter_path(name, "merge"), admin=True, read=_json(parse))


def load_lora_adapter(name: str, path: str | Path) -> Call[None]:
    """vLLM-compatible: register an adapter from a path the server may read (``allowed_lora_roots``)."""
    body = {"lora_name": name, "lora_path": str(path)}
    return Call("POST", "/v1/load_lora_adapter", admin=True, json=body, read=_json(_nothing))


def unload_lora_adapter(name: str) -> Call[None]:
    body = {"lora_name": name}
    return Call("POST", "/v1/unload_lora_adapter", admin=True, json=body, read=_json(_nothing))


# --- operations ---------------------------------------------------------------------------------
def probe(path: str) -> Call[bool]:
    """``/health`` or ``/ready``: True on 200; any other status is an answer too, not an error."""
    return Call("GET", path, read=_is_200)


def metrics() -> Call[str]:
    """Prometheus text exposition."""
    return Call("GET", "/metrics", read=_text)
