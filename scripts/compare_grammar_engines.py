"""xgrammar vs llguidance on this machine: the measurement that chose loraplex's grammar engine.

Needs both installed (``pip install xgrammar llguidance``; only xgrammar is a dependency). For each
tokenizer: preparing the tokenizer, compiling a JSON schema (cold, median of 3), and the per-step work
the engine thread does for a batch of constrained requests (fill each row's token bitmask, advance
each matcher by one token), walking a valid document token by token.

    python scripts/compare_grammar_engines.py [--batch 32]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers import AutoTokenizer

from benchmarks.structured_bench import stdlib_corpus
from server.config import DEFAULT_MODEL_DIR
from server.model.synthetic import byte_bpe_tokenizer

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string", "pattern": "^[a-z]+@[a-z]+\\.com$"},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 5},
        "address": {
            "type": "object",
            "properties": {"street": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["street", "zip"],
            "additionalProperties": False,
        },
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "tags", "address", "active"],
    "additionalProperties": False,
}
DOC = {
    "name": "Ada Lovelace",
    "age": 36,
    "email": "ada@math.com",
    "tags": ["red", "blue"],
    "address": {"street": "12 St James Square", "zip": "01234"},
    "active": True,
}


def xgrammar_case(tok, vocab: int, batch: int):
    import xgrammar as xgr

    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab)

    def compile_once():
        compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        return compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False, separators=(",", ":"))

    def matchers(compiled):
        return [xgr.GrammarMatcher(compiled) for _ in range(batch)]

    def step(ms, bitmask, token):
        for i, m in enumerate(ms):
            m.fill_next_token_bitmask(bitmask, i)
        assert all(m.accept_token(token) for m in ms)

    return compile_once, matchers, step


def llguidance_case(tok, vocab: int, batch: int):
    import llguidance
    import llguidance.hf
    import llguidance.torch as lt

    lltok = llguidance.hf.from_tokenizer(tok, n_vocab=vocab)
    options = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}
    grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA, defaults=options)

    def compile_once():
        assert not llguidance.LLMatcher.validate_grammar(grammar, lltok)
        return grammar

    def matchers(compiled):
        return [llguidance.LLMatcher(lltok, compiled, log_level=0) for _ in range(batch)]

    def step(ms, bitmask, token):
        for i, m in enumerate(ms):
            lt.fill_next_token_bitmask(m, bitmask, i)
        assert all(m.consume_token(token) for m in ms)

    return compile_once, matchers, step


def measure(case, tok, batch: int) -> tuple[float, float, float, float]:
    vocab = len(tok)
    t = time.perf_counter()
    compile_once, matchers, step = case(tok, vocab, batch)
    prep = time.perf_counter() - t
    compiles = []
    for _ in range(3):
        t = time.perf_counter()
        compiled = compile_once()
        compiles.append(time.perf_counter() - t)
    ms = matchers(compiled)
    bitmask = torch.full((batch, (vocab + 31) // 32), -1, dtype=torch.int32)
    steps = []
    for token in tok.encode(json.dumps(DOC, separators=(",", ":")), add_special_tokens=False):
        t = time.perf_counter()
        step(ms, bitmask, token)
        steps.append(time.perf_counter() - t)
    return prep, statistics.median(compiles) * 1e3, statistics.median(steps) * 1e3, max(steps) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32, help="constrained requests in the batch")
    args = parser.parse_args()
    torch.set_num_threads(1)
    tokenizers = {
        "demo model": AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR),
        "byte BPE on the stdlib": byte_bpe_tokenizer(32000, stdlib_corpus()),
    }
    print(f"batch of {args.batch} constrained requests, torch threads 1")
    print(
        "| tokenizer (vocab) | engine | tokenizer prep s | schema compile ms | step ms (median) | worst step ms |"
    )
    print("|---|---|---|---|---|---|")
    for name, tok in tokenizers.items():
        for engine, case in (("xgrammar", xgrammar_case), ("llguidance", llguidance_case)):
            prep, comp, step, worst = measure(case, tok, args.batch)
            print(f"| {name} ({len(tok)}) | {engine} | {prep:.2f} | {comp:.1f} | {step:.3f} | {worst:.2f} |")


if __name__ == "__main__":
    main()
