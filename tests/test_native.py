"""The native kernels' packaging and fallback: every C++ source ships with the package (an install
without one is what the container test caught), and a kernel whose source is missing falls back to
the torch ops instead of failing the engine's start."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.native import load_kernel

ROOT = Path(__file__).resolve().parents[1]


def test_every_native_source_is_package_data():
    tomllib = pytest.importorskip("tomllib")
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    shipped = set()
    for package, globs in package_data.items():
        base = ROOT.joinpath(*package.split("."))
        for pattern in globs:
            shipped.update(base.glob(pattern))
    sources = {p for p in (ROOT / "server").rglob("csrc/*") if p.suffix in (".cpp", ".h")}
    assert sources and sources <= shipped, sorted(str(p.relative_to(ROOT)) for p in sources - shipped)


def test_a_missing_source_falls_back_instead_of_raising(tmp_path):
    assert load_kernel("loraplex_missing_for_test", tmp_path / "absent.cpp") is False
