"""The layering rules of docs/architecture.md, checked on the source so they stay true.

- imports point one way: ``server.lora`` imports neither ``server.engine`` nor ``server.api``;
  ``server.engine`` does not import ``server.api`` (nor ``server.lora``: it owns a protocol instead);
  ``server.structured`` (the grammar engine) imports none of them: it satisfies the engine's protocol;
  nothing below ``server.api`` imports ``server.api``;
- no ``server/api`` module touches a ``_private`` name of another package;
- HTTP status codes live in ``server/api`` only;
- no class in ``server/`` is over 150 lines and no function over 60.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SERVER = Path(__file__).resolve().parent.parent / "server"
MAX_CLASS_LINES = 150
MAX_FUNCTION_LINES = 60


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(SERVER.rglob("*.py")):
        name = ".".join(path.relative_to(SERVER.parent).with_suffix("").parts).removesuffix(".__init__")
        out[name] = ast.parse(path.read_text(), filename=str(path))
    return out


MODULES = _modules()


def _imports(tree: ast.Module) -> list[tuple[str, list[str]]]:
    """(imported module, imported names) for every import, lazy ones inside functions included."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.module, [alias.name for alias in node.names]))
    return found


FORBIDDEN = {  # package -> packages it must not import
    "server.lora": ("server.engine", "server.api", "server.service", "server.bootstrap"),
    "server.engine": ("server.api", "server.lora", "server.service", "server.bootstrap", "server.structured"),
    "server.model": ("server.engine", "server.api", "server.lora", "server.service", "server.bootstrap"),
    "server.service": ("server.api", "server.bootstrap"),
    "server.store": ("server.engine", "server.api", "server.lora", "server.model", "server.service"),
    "server.confined": (
        "server.engine",
        "server.api",
        "server.lora",
        "server.model",
        "server.service",
        "server.store",
    ),
    "server.structured": (
        "server.engine",
        "server.api",
        "server.lora",
        "server.model",
        "server.service",
        "server.bootstrap",
    ),  # fmt: skip
}


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_point_one_way(package):
    bad = [
        f"{module} imports {imported}"
        for module, tree in MODULES.items()
        if module == package or module.startswith(package + ".")
        for imported, _ in _imports(tree)
        if imported.startswith(FORBIDDEN[package])
    ]
    assert not bad, bad


def test_api_uses_no_private_names_of_other_packages():
    bad = []
    for module, tree in MODULES.items():
        if not module.startswith("server.api"):
            continue
        for imported, names in _imports(tree):
            if imported.startswith("server.") and not imported.startswith("server.api"):
                bad += [f"{module}: from {imported} import {n}" for n in names if n.startswith("_")]
    assert not bad, bad


def test_http_statuses_only_in_the_api():
    """No ``status``/``status_code``/``error_status`` attribute or keyword outside server/api."""
    bad = []
    for module, tree in MODULES.items():
        if module.startswith("server.api"):
            continue
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Attribute):
                names.append(node.attr)
            elif isinstance(node, ast.keyword) and node.arg:
                names.append(node.arg)
            elif isinstance(node, ast.Name):
                names.append(node.id)
            bad += [f"{module}:{node.lineno} {n}" for n in names if n in ("status_code", "error_status")]
    assert not bad, bad


def _spans(kind) -> list[tuple[str, int]]:
    return [
        (f"{module}.{node.name}", node.end_lineno - node.lineno + 1)
        for module, tree in MODULES.items()
        for node in ast.walk(tree)
        if isinstance(node, kind)
    ]


def test_no_class_over_150_lines():
    assert not [(n, s) for n, s in _spans(ast.ClassDef) if s > MAX_CLASS_LINES]


def test_no_function_over_60_lines():
    assert not [(n, s) for n, s in _spans((ast.FunctionDef, ast.AsyncFunctionDef)) if s > MAX_FUNCTION_LINES]
