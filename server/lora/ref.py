"""Which LoRA weights a request runs with: one stored adapter, or a weighted composition of several.

Torch-free, so the HTTP layer can build references without importing the model code. The engine
never looks inside a reference: it only uses ``key`` (slot bookkeeping, stats), which is why the
key's format - and reading it back - lives here, next to the one place that writes it.
"""

from __future__ import annotations

from dataclasses import dataclass

_COMPOSE_PREFIX = "compose("


@dataclass(frozen=True)
class AdapterRef:
    """``name`` is one adapter from the store; ``weights`` (name -> weight) asks for a weighted
    composition, served as one virtual adapter. Exactly one of the two is set."""

    name: str | None = None
    weights: dict[str, float] | None = None

    def __post_init__(self) -> None:
        if (self.name is None) == (not self.weights):
            raise ValueError("an AdapterRef names exactly one adapter or one non-empty composition")

    @property
    def key(self) -> str:
        """Identity of the (possibly virtual) adapter, used for slots, caching and metrics."""
        if not self.weights:
            return self.name
        parts = ",".join(f"{n}:{w!r}" for n, w in sorted(self.weights.items()))
        return f"{_COMPOSE_PREFIX}{parts})"

    @property
    def names(self) -> list[str]:
        """The stored adapters this reference reads, sorted."""
        return sorted(self.weights) if self.weights else [self.name]


def names_in_key(key: str) -> list[str]:
    """The stored adapters an ``AdapterRef.key`` reads (the inverse of ``key`` for the names)."""
    if key.startswith(_COMPOSE_PREFIX) and key.endswith(")"):
        return [part.rsplit(":", 1)[0] for part in key[len(_COMPOSE_PREFIX) : -1].split(",")]
    return [key]
