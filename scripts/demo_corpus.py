"""Offline text corpora for the demo model and its adapters.

Everything comes from files that ship with CPython (``pydoc_data.topics``, stdlib sources and docstrings,
CPython's ``LICENSE.txt``) plus Debian's ``/usr/share/common-licenses`` (package ``base-files``, present
on every Debian system), so training needs no download. Sources are read in a fixed, sorted order so the
same Python install always yields the same text; :func:`digest` lets a re-run confirm that.
"""

from __future__ import annotations

import ast
import hashlib
import re
import sys
import sysconfig
from pathlib import Path

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>")

# HF convention: the template carries the BOS token and the tokenizer is then called without special tokens.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# Top-level stdlib modules left out of the prose corpus: distro-split (turtle lives in python3-tk on
# Debian), doctest-heavy (numbers rather than prose) or joke modules.
_EXCLUDED_MODULES = frozenset({"turtle", "doctest", "antigravity", "this", "pydoc"})

# Small, self-contained stdlib modules whose source is the "code" style; all are plain top-level files.
CODE_MODULES = (
    "abc", "base64", "bisect", "calendar", "colorsys", "contextlib", "copy", "filecmp", "fnmatch",
    "fractions", "getopt", "glob", "graphlib", "heapq", "linecache", "netrc", "numbers", "operator",
    "pprint", "queue", "quopri", "random", "reprlib", "sched", "secrets", "shlex", "stat", "statistics",
    "string", "textwrap",
)  # fmt: skip

LICENSE_FILES = (
    "Apache-2.0", "Artistic", "BSD", "CC0-1.0", "GFDL-1.3", "GPL-2", "GPL-3", "LGPL-2.1", "LGPL-3", "MPL-2.0",
)  # fmt: skip
COMMON_LICENSES = Path("/usr/share/common-licenses")

_QUESTION_TEMPLATES = (
    "What does {name} do?",
    "Explain {name}.",
    "Tell me about {name}.",
    "How do I use {name}?",
)


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _prose_modules() -> list[Path]:
    names = sys.stdlib_module_names - _EXCLUDED_MODULES
    return [
        path
        for path in sorted(stdlib_dir().glob("*.py"))
        if path.stem in names and not path.stem.startswith("_")
    ]


def _prose(docstring: str) -> str:
    """Drops doctest paragraphs: interactive sessions teach the model numbers and prompts, not prose."""
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", docstring)]
    return "\n\n".join(p for p in paragraphs if p and ">>>" not in p)


def _documented_nodes(tree: ast.Module, module: str) -> list[tuple[str, str]]:
    """(qualified name, docstring) for the module, its classes, functions and methods, in source order."""
    found: list[tuple[str, str]] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}.{child.name}"
                doc = ast.get_docstring(child, clean=True)
                if doc:
                    found.append((name, doc))
                if isinstance(child, ast.ClassDef):
                    visit(child, name)

    doc = ast.get_docstring(tree, clean=True)
    if doc:
        found.append((module, doc))
    visit(tree, module)
    return found


def docstring_entries(min_chars: int = 80) -> list[tuple[str, str]]:
    """Public (qualified name, prose docstring) pairs from the top-level stdlib modules."""
    entries = []
    for path in _prose_modules():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for name, doc in _documented_nodes(tree, path.stem):
            text = _prose(doc)
            if len(text) >= min_chars and not any(part.startswith("_") for part in name.split(".")[1:]):
                entries.append((name, text))
    return entries


def topic_texts() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[key].strip() for key in sorted(topics)]


def base_documents() -> list[str]:
    """The prose of the base model: the language reference topics, then each module's docstrings."""
    by_module: dict[str, list[str]] = {}
    for name, text in docstring_entries():
        by_module.setdefault(name.split(".")[0], []).append(text)
    return topic_texts() + ["\n\n".join(texts) for _, texts in sorted(by_module.items())]


def pretraining_documents() -> list[str]:
    """The base model's plain text: mostly prose, plus a sample of every adapter style (half the code
    modules, the licenses, an eighth of the shouting). The tokenizer learns its vocabulary from all of
    it, and a token the base never saw keeps a random embedding that a frozen-embedding LoRA cannot
    repair; with every style seen, an adapter only has to select and sharpen one, which a small rank
    learns in a minute or two."""
    return base_documents() + code_documents()[::2] + legal_documents() + shout_documents()[::8]


def render_chat(messages: list[dict[str, str]], bos: str = "<s>", eos: str = "</s>") -> str:
    """The same string CHAT_TEMPLATE renders, so training sees exactly what serving sends."""
    turns = "".join(f"<|{m['role']}|>\n{m['content']}{eos}\n" for m in messages)
    return bos + turns


def _first_paragraphs(text: str, max_chars: int = 600) -> str:
    kept: list[str] = []
    for paragraph in text.split("\n\n"):
        if kept and sum(map(len, kept)) + len(paragraph) > max_chars:
            break
        kept.append(paragraph)
    return "\n\n".join(kept)


def chat_documents() -> list[str]:
    """Question/answer turns built from function and class docstrings, so the chat template means
    something to the model: a user question is followed by an assistant answer that ends with EOS."""
    docs = []
    for i, (name, text) in enumerate(docstring_entries()):
        if "." not in name:
            continue
        question = _QUESTION_TEMPLATES[i % len(_QUESTION_TEMPLATES)].format(name=name)
        messages = [
            {"role": "user", "content": question},
            {"role": "assistant", "content": _first_paragraphs(text)},
        ]
        docs.append(render_chat(messages))
    return docs


def code_documents() -> list[str]:
    root = stdlib_dir()
    return [(root / f"{name}.py").read_text(encoding="utf-8") for name in CODE_MODULES]


def legal_documents() -> list[str]:
    """CPython's license plus the Debian common licenses that exist here (re-runs log the digest)."""
    paths = [stdlib_dir() / "LICENSE.txt"] + [COMMON_LICENSES / name for name in LICENSE_FILES]
    docs = [p.read_text(encoding="utf-8") for p in paths if p.is_file()]
    if not docs:
        raise FileNotFoundError("no license text found (CPython LICENSE.txt or /usr/share/common-licenses)")
    return docs


def shout_documents() -> list[str]:
    return [text.upper() for text in topic_texts()]


def words(texts: list[str]) -> set[str]:
    """Lower-cased alphabetic words, for checking that generated text is made of corpus vocabulary."""
    return {w.lower() for text in texts for w in re.findall(r"[A-Za-z]+", text)}


def digest(texts: list[str]) -> str:
    h = hashlib.sha256()
    for text in texts:
        h.update(text.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()[:16]
