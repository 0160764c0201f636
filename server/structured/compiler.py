"""Compiles :class:`GrammarSpec`s with xgrammar, once per (tokenizer, spec), off the engine thread.

xgrammar was chosen over llguidance by measurement on the CPU this project targets
(``scripts/compare_grammar_engines.py``): it compiles a schema up front (tens of ms, here on a worker
thread, then cached) and then fills a batch's token masks ~14x faster per step, so the engine
thread only does cheap per-token work. One compiler serves one tokenizer, so its cache is keyed
by the spec alone. The matchers it hands out satisfy ``server.engine.structured.GrammarMatcher``.
"""

from __future__ import annotations

import asyncio
import re
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from server.structured.spec import GrammarSpec

_CPP_PREFIX = re.compile(r"^\[[^\]]*\]\s*\S+:\d+:\s*")  # "[12:00:00] /project/cpp/x.cc:12: "
# xgrammar (0.2.x) writes the characters of a length-limited JSON string (maxLength / minLength) as
# any character but quote, backslash, CR and LF: raw control characters slip through, which JSON
# forbids. We tighten that one character class to JSON's (no control characters at all).
_LOOSE_STRING_CHARS = r"[^\"\\\r\n]"
_JSON_STRING_CHARS = r"[^\0-\x1f\"\\]"


class InvalidGrammarError(ValueError):
    """The schema, regex, choices or grammar cannot be compiled; the message says why."""


class XGrammarMatcher:
    """One request's position in its grammar (the engine's ``GrammarMatcher``)."""

    def __init__(self, matcher: Any) -> None:
        self._matcher = matcher

    def fill_bitmask(self, bitmask, row: int) -> None:
        self._matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, token: int) -> bool:
        return self._matcher.accept_token(token)

    def is_finished(self) -> bool:
        return self._matcher.is_terminated()


class XGrammar:
    """A compiled grammar (the engine's ``Grammar``); shared by every request with the same spec."""

    def __init__(self, compiled: Any) -> None:
        self._compiled = compiled

    def matcher(self) -> XGrammarMatcher:
        import xgrammar

        return XGrammarMatcher(xgrammar.GrammarMatcher(self._compiled))


class GrammarCompiler:
    """Compiles specs for one tokenizer on one worker thread and keeps the last ``cache_size``."""

    def __init__(
        self, tokenizer: Any, vocab_size: int, stop_token_ids: frozenset[int], cache_size: int = 256
    ):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = sorted(stop_token_ids)
        self.cache_size = cache_size
        self._cache: OrderedDict[GrammarSpec, XGrammar] = OrderedDict()  # touched on the worker only
        self._compiler: Any = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loraplex-grammar")

    def prepare(self) -> None:
        """Reads the tokenizer's vocabulary (once). Call it where the tokenizer may be used (the API's
        tokenizer thread): fast tokenizers must not be used from two threads at once."""
        if self._compiler is None:
            import xgrammar

            info = xgrammar.TokenizerInfo.from_huggingface(
                self.tokenizer, vocab_size=self.vocab_size, stop_token_ids=self.stop_token_ids
            )
            self._compiler = xgrammar.GrammarCompiler(info, max_threads=1, cache_enabled=False)

    async def compile(self, spec: GrammarSpec) -> XGrammar:
        """The compiled grammar, from the cache or compiled on the worker thread (after ``prepare``)."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, self.compile_sync, spec)

    def compile_sync(self, spec: GrammarSpec) -> XGrammar:
        """``compile`` in the calling thread (benchmarks, tests); the API uses ``compile``."""
        if self._compiler is None:
            raise RuntimeError("GrammarCompiler.prepare() must run first")
        grammar = self._cache.get(spec)
        if grammar is None:
            grammar = XGrammar(self._compile(spec))
            self._cache[spec] = grammar
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        self._cache.move_to_end(spec)
        return grammar

    def _compile(self, spec: GrammarSpec) -> Any:
        compiler = self._compiler
        try:
            if spec.kind == "json_schema":
                return compiler.compile_grammar(_json_schema_grammar(spec.source))
            if spec.kind == "regex":
                return compiler.compile_regex(spec.source)
            if spec.kind == "choice":
                return compiler.compile_grammar(spec.ebnf_of_choice())
            return compiler.compile_grammar(spec.source)
        except (RuntimeError, ValueError, TypeError) as exc:
            message = _CPP_PREFIX.sub("", str(exc).strip()).strip()
            raise InvalidGrammarError(f"invalid {spec.kind.replace('_', ' ')}: {message}") from None

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _json_schema_grammar(schema: str) -> Any:
    """The schema as an xgrammar grammar: one compact layout (``", "`` / ``": "``, no free
    whitespace, so small models cannot wander off into blank space), strings that are valid JSON."""
    import xgrammar

    grammar = xgrammar.Grammar.from_json_schema(schema, any_whitespace=False, separators=(", ", ": "))
    return xgrammar.Grammar.from_ebnf(str(grammar).replace(_LOOSE_STRING_CHARS, _JSON_STRING_CHARS))
