"""Server-sent events, reduced to the subset OpenAI-style streams use.

A stream is ``data: {json}`` events separated by blank lines and closed by ``data: [DONE]``. Kept as
line-fed state machines with no I/O (:class:`SSEDecoder` for events, :class:`ChunkDecoder` for whole
chunks) so the sync and async clients share all of it, only feeding lines, and tests can feed it lines.
"""

from __future__ import annotations

import json
from typing import Any

from clients.errors import StreamError, error_fields
from clients.types import StreamChunk

DONE = "[DONE]"


class SSEDecoder:
    """Feed lines with :meth:`feed`; it returns the event's data when a blank line ends an event."""

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed(self, line: str) -> str | None:
        line = line.rstrip("\r\n")
        if not line:
            return self.flush()
        if line.startswith(":"):
            return None  # comment / keep-alive
        fieldname, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if fieldname == "data":
            self._data.append(value)
        return None  # event:, id:, retry: are not used by these streams

    def flush(self) -> str | None:
        """End of the current event (blank line or end of stream); None when nothing was buffered."""
        if not self._data:
            return None
        data = "\n".join(self._data)
        self._data = []
        return data


def decode_event(data: str) -> dict[str, Any] | None:
    """Parse one event's data; None for ``[DONE]``; raise StreamError for an in-stream error object."""
    if data.strip() == DONE:
        return None
    try:
        payload = json.loads(data)
    except json.JSONDecodeError as exc:
        raise StreamError(f"malformed stream event: {data[:200]!r}") from exc
    if isinstance(payload, dict) and "error" in payload and "choices" not in payload:
        fields = error_fields(payload)
        code = fields.get("code")
        status = code if isinstance(code, int) else None
        raise StreamError(
            str(fields.get("message") or "error in stream"),
            status=status,
            type=fields.get("type"),
            code=code,
            body=payload,
        )
    if not isinstance(payload, dict):
        raise StreamError(f"unexpected stream event: {data[:200]!r}")
    return payload


class ChunkDecoder:
    """Lines of a streamed generation in, :class:`StreamChunk` out.

    The transport loops ``for line in lines: yield from feed(line)``, stops once :attr:`done` (the
    ``[DONE]`` event: anything after it is not read), and at the end of the body yields :meth:`end`.
    """

    def __init__(self) -> None:
        self._events = SSEDecoder()
        self.done = False

    def feed(self, line: str) -> list[StreamChunk]:
        return self._chunks(self._events.feed(line))

    def end(self) -> list[StreamChunk]:
        """The body ended: a last event not closed by a blank line still counts."""
        return self._chunks(self._events.flush())

    def _chunks(self, data: str | None) -> list[StreamChunk]:
        if data is None or self.done:
            return []
        event = decode_event(data)
        if event is None:
            self.done = True
            return []
        return [StreamChunk.from_dict(event)]
