"""The line protocol between the offline benchmark and a system's worker process (stdlib only: the
vLLM worker imports it from inside vLLM's own virtualenv).

The worker prints ``@@peer {json}`` lines on stdout (everything else there is its log) and reads one
JSON command per line on stdin: first it announces ``{"op": "ready", "start_s": ...}``, then answers
each ``{"op": "run", "mode": "base" | "mixed", "round": r}`` or ``{"op": "probe"}`` until ``{"op": "quit"}``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable

MARK = "@@peer "


def round_prompts(prompts: list[list[int]], round_: int) -> list[list[int]]:
    """The prompts of round ``round_`` (1, 2, ...): each rotated left by that many tokens. Every round is
    new to every system's prefix cache (their first tokens differ), so each run pays its whole prefill as
    the workload says, never a cached one from the round before; all systems get the same prompts."""
    return [p[round_ % len(p) :] + p[: round_ % len(p)] for p in prompts]


def send(message: dict) -> None:
    print(MARK + json.dumps(message), flush=True)


def parse(line: str) -> dict | None:
    """The message on a worker's stdout line, or None for a log line."""
    return json.loads(line[len(MARK) :]) if line.startswith(MARK) else None


def serve(handlers: dict[str, Callable[[dict], dict]], start_s: float) -> None:
    """Announces readiness, then answers commands from stdin until ``quit`` or end of input."""
    send({"op": "ready", "start_s": start_s})
    for line in sys.stdin:
        command = json.loads(line)
        if command["op"] == "quit":
            return
        try:
            send({"op": command["op"], **handlers[command["op"]](command)})
        except Exception as exc:  # the parent reports it and goes on with the other systems
            send({"op": command["op"], "error": f"{type(exc).__name__}: {exc}"})
