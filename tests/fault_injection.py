"""A ``StepFaults`` for tests: make chosen engine steps raise or hang (server/engine/faults.py)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from server.engine.faults import FaultPoint


@dataclass
class _Rule:
    point: FaultPoint
    when: Callable[[list], bool]
    action: Callable[[], None]
    remaining: int


class InjectedFaults:
    """Rules fire at a point of a step whose sequences satisfy ``when``, at most ``times`` times."""

    def __init__(self) -> None:
        self._rules: list[_Rule] = []
        self._lock = threading.Lock()
        self.fired: list[tuple[FaultPoint, list[str]]] = []  # (point, request ids of the step)

    def raise_at(self, point: FaultPoint, exc: BaseException, when=None, times: int = 1) -> InjectedFaults:
        def action() -> None:
            raise exc

        return self._add(point, action, when, times)

    def hang_at(
        self, point: FaultPoint, release: threading.Event, when=None, times: int = 1
    ) -> InjectedFaults:
        return self._add(point, lambda: release.wait(60), when, times)

    def _add(self, point, action, when, times) -> InjectedFaults:
        with self._lock:
            self._rules.append(_Rule(point, when or (lambda seqs: True), action, times))
        return self

    def at(self, point: FaultPoint, seqs) -> None:
        with self._lock:
            rule = next((r for r in self._rules if r.point == point and r.remaining and r.when(seqs)), None)
            if rule is None:
                return
            rule.remaining -= 1
            self.fired.append((point, [s.request_id for s in seqs]))
        rule.action()


def first_token_is(token: int) -> Callable[[list], bool]:
    """``when`` for a step holding a sequence whose prompt starts with ``token`` (a poisoned request)."""
    return lambda seqs: any(s.token_ids[0] == token for s in seqs)
