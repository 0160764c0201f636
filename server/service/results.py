"""Typed results of the adapter service (the HTTP layer renders them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


@dataclass(frozen=True)
class AdapterInfo:
    """One adapter: store facts (when it is in the store) and whether it holds a device slot now."""

    name: str
    source: Literal["store", "path"]
    resident: bool
    rank: int | None = None
    target_modules: list[str] | str | None = None
    size_bytes: int | None = None
    digest: str | None = None  # "sha256:<hex>" of the directory's manifest
    config: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MergeResult:
    name: str
    path: Path
    digest: str  # "sha256:<hex>"
