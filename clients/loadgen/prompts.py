"""Synthetic prompts of a requested token length.

Prompts are seeded per request index, so two servers (or a re-run) see the same text. By default they
are random English words; with a tokenizer (any HF tokenizer directory, loaded locally) the prompt is
cut to exactly the requested number of tokens, and ``source="vocab"`` draws random tokens from the
tokenizer's own vocabulary instead (for synthetic tokenizers that know no English). Without a
tokenizer one word stands in for one token and the server's reported ``prompt_tokens`` is the truth.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

_WORD_TEXT = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but "
    "have an they you were her she there been one all we their has would when if so no will can more "
    "other some what about into than time only could new these two may first then do any like my now "
    "over such our man me even most made after also did many before must through back years where much "
    "your way well down should because each just those people how too little state good very make world "
    "still own see men work long get here between both life being under never day same another know while "
    "last might us great old year off come since against go came right used take three model server "
    "adapter token batch kernel request queue latency memory python module function value return class"
)
WORDS = tuple(_WORD_TEXT.split())


class PromptFactory:
    """``prompt(index, n_tokens)`` -> text; deterministic in (seed, index, n_tokens)."""

    def __init__(self, seed: int = 0, tokenizer: Any = None, source: str = "words") -> None:
        if source not in ("words", "vocab"):
            raise ValueError("prompt source must be 'words' or 'vocab'")
        if source == "vocab" and tokenizer is None:
            raise ValueError("prompt source 'vocab' needs a tokenizer")
        self.seed = seed
        self.tokenizer = tokenizer
        self.source = source

    @classmethod
    def from_tokenizer_dir(
        cls, path: str | Path | None, seed: int = 0, source: str = "words"
    ) -> PromptFactory:
        if path is None:
            return cls(seed, source=source)
        from transformers import AutoTokenizer  # optional: only when exact lengths are asked for

        return cls(seed, AutoTokenizer.from_pretrained(str(path)), source)

    def _words(self, index: int, count: int) -> list[str]:
        rng = random.Random(f"{self.seed}:prompt:{index}")
        return [rng.choice(WORDS) for _ in range(count)]

    def prompt(self, index: int, n_tokens: int) -> str:
        if self.tokenizer is None:
            return " ".join(self._words(index, n_tokens))
        if self.source == "vocab":
            rng = random.Random(f"{self.seed}:prompt:{index}")
            special = set(getattr(self.tokenizer, "all_special_ids", []) or [])
            pool = len(self.tokenizer)
            ids = []
            while len(ids) < n_tokens:
                t = rng.randrange(pool)
                if t not in special:
                    ids.append(t)
        else:
            words = self._words(index, n_tokens + 8)  # every word is at least one token
            ids = self.tokenizer.encode(" ".join(words), add_special_tokens=False)[:n_tokens]
        text = self.tokenizer.decode(ids)
        # Decoding then re-encoding can merge differently at the cut; trim until it fits.
        while ids and len(self.tokenizer.encode(text, add_special_tokens=False)) > n_tokens:
            ids = ids[:-1]
            text = self.tokenizer.decode(ids)
        return text
