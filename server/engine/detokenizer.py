"""Incremental detokenization that only ever emits complete UTF-8 text, and stop-string handling.

Decoding token by token breaks multi-byte characters and byte-level BPE spacing, so we decode a
small sliding window (``prefix_offset:read_offset`` is text already emitted) and emit the
difference only when it does not end in a replacement character. Text that could still turn out
to be the start of a stop string is held back until it is known not to be one.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

try:  # transformers >= 5: the fast tokenizers' base class
    from transformers.tokenization_utils_tokenizers import TokenizersBackend
except ImportError:  # pragma: no cover - older transformers
    TokenizersBackend = None

_CONTEXT_TOKENS = 6  # prompt tokens kept so the first output token decodes with correct spacing
_MAX_CONTEXT_TOKENS = 96  # how far back to look for prompt text when the tail is all special tokens


class IncrementalDetokenizer:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_ids: list[int], stop: list[str]) -> None:
        self.tokenizer = tokenizer
        self._backend = _plain_backend(tokenizer)
        self.tokens: list[int] = self._context(prompt_ids)
        self.prefix_offset = 0
        self.read_offset = len(self.tokens)
        self.stop = [s for s in stop if s]
        self.holdback = max((len(s) for s in self.stop), default=1) - 1
        self.text = ""  # all output text decoded so far
        self.sent = 0  # characters of ``text`` already streamed

    def _decode(self, ids: list[int]) -> str:
        if self._backend is not None:  # what decode() runs for these arguments, minus its Python
            return self._backend.decode(ids, skip_special_tokens=True)
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _context(self, prompt_ids: list[int]) -> list[int]:
        """The prompt's tail that the first output token is decoded after. Decoders that put spaces
        between tokens (WordPiece, Metaspace) give the first token of a decode no space, so the tail
        must decode to some text: when its last tokens are all special (skipped), look further back,
        so prompt text + output text is the decoding of all ids."""
        start = max(0, len(prompt_ids) - _CONTEXT_TOKENS)
        floor = max(0, len(prompt_ids) - _MAX_CONTEXT_TOKENS)
        while start > floor and not self._decode(prompt_ids[start:]):
            start = max(floor, start - _CONTEXT_TOKENS)
        return list(prompt_ids[start:])

    def add_tokens(self, new_ids: list[int], check_stop: bool = True) -> str | None:
        """Appends tokens; returns the matched stop string if generation must stop here (only looked
        for when ``check_stop``: not before the request's ``min_tokens``)."""
        self.tokens.extend(new_ids)
        prefix_text = self._decode(self.tokens[self.prefix_offset : self.read_offset])
        new_text = self._decode(self.tokens[self.prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            search_from = max(0, len(self.text) - self.holdback)
            self.text += new_text[len(prefix_text) :]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.tokens)
            for stop in self.stop if check_stop else ():
                at = self.text.find(stop, search_from)
                if at != -1:
                    self.text = self.text[:at]
                    return stop
        return None

    def flush(self, finished: bool) -> str:
        """Text that is safe to stream now; everything that is left once ``finished``."""
        if finished:
            if self.read_offset < len(self.tokens):  # trailing bytes of an unfinished character
                tail = self._decode(self.tokens[self.prefix_offset :])
                head = self._decode(self.tokens[self.prefix_offset : self.read_offset])
                self.text += tail[len(head) :]
                self.read_offset = len(self.tokens)
            end = len(self.text)
        else:
            end = max(self.sent, len(self.text) - self.holdback)
        delta = self.text[self.sent : end]
        self.sent = end
        return delta


def _plain_backend(tokenizer: PreTrainedTokenizerBase):
    """The Rust tokenizer behind ``tokenizer`` when its ``decode(ids, skip_special_tokens=True,
    clean_up_tokenization_spaces=False)`` is exactly the backend's decode (a fast tokenizer whose
    class keeps the base ``_decode``), else None. Two decodes per token per sequence run on the engine
    thread: the wrapper's argument handling was about half of their time."""
    if TokenizersBackend is None or not isinstance(tokenizer, TokenizersBackend):
        return None
    if type(tokenizer)._decode is not TokenizersBackend._decode:
        return None
    return getattr(tokenizer, "_tokenizer", None)
