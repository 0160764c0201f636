"""What was observed for one request of a load run.

Times are seconds since the run's start on one monotonic clock. Latencies are measured from the
*scheduled* arrival, not from when the request was finally sent: in an open-loop test a request held
back by the client's concurrency cap or a late event loop is still waiting from the user's point of
view, and measuring from the send time would hide exactly the queueing a saturated server causes
(coordinated omission).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import pairwise


@dataclass
class RequestRecord:
    index: int
    adapter: str | None
    scheduled_at: float
    prompt: str = ""
    sent_at: float | None = None
    first_token_at: float | None = None
    finished_at: float | None = None
    chunk_times: list[float] = field(default_factory=list)  # arrival of each non-empty text chunk
    text: str = ""
    prompt_tokens: int | None = None
    output_tokens: int = 0
    finish_reason: str | None = None
    error_kind: str | None = None  # None = success; "429", "500", "connection", "timeout", "stream", ...
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error_kind is None and self.finished_at is not None

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.scheduled_at

    @property
    def e2e(self) -> float | None:
        return None if self.finished_at is None else self.finished_at - self.scheduled_at

    @property
    def inter_token(self) -> list[float]:
        """Gaps between streamed chunks; a chunk is one token unless the server coalesces."""
        t = self.chunk_times
        return [b - a for a, b in pairwise(t)]
