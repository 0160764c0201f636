"""The engine's fault-injection seam: fixed points of ``LLMEngine.step`` where a test can make the step
fail or hang, to check that one bad step fails only its own requests and that a hung one is noticed.

Production code never sets it (``LLMEngine.faults`` stays ``NO_FAULTS``, an empty call per point). It is an
explicit object rather than monkeypatching so the points stay where the step's real failures happen:
activating adapter slots, the model forward, sampling, and appending the sampled tokens.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from enum import Enum
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from server.engine.sequence import Sequence


class FaultPoint(str, Enum):
    ACTIVATE = "activate"  # the step's adapters are about to be copied into device slots
    FORWARD = "forward"  # the packed batch is about to run through the model
    SAMPLED = "sampled"  # tokens were sampled, not yet appended to their sequences
    POSTPROCESS = "postprocess"  # tokens appended; outputs (detokenize, stop checks) being built


class StepFaults(Protocol):
    def at(self, point: FaultPoint, seqs: Seq[Sequence]) -> None:
        """Called at ``point`` of every step that runs a batch; may raise (the step fails) or block (the
        step hangs)."""
        ...


class NoFaults:
    def at(self, point: FaultPoint, seqs: Seq[Sequence]) -> None:
        return None


NO_FAULTS = NoFaults()
