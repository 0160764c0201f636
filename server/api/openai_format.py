"""OpenAI response shapes for completions and chat completions, whole and as SSE chunks.

Kept apart from the routes so both routes build identical ``usage``, ``logprobs`` and chunk framing.
"""

from __future__ import annotations

import json
import time

from server.api.generation import Choice

DONE = "data: [DONE]\n\n"


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'), ensure_ascii=False)}\n\n"


def token_pieces(tokenizer, token_ids: list[int]) -> list[str]:
    """Each token decoded on its own (what OpenAI's ``tokens`` / ``token`` fields show).

    ``tokenizer=None`` renders ``token_id:<id>`` instead (vLLM's ``return_tokens_as_token_ids``),
    which is exact where single-token decoding is not (partial UTF-8 bytes).
    """
    if tokenizer is None:
        return [f"token_id:{t}" for t in token_ids]
    return [tokenizer.decode([t], skip_special_tokens=False) for t in token_ids]


def completion_logprobs(tokenizer, token_ids: list[int], logprobs: list[float], offset: int) -> dict:
    """Legacy completions ``logprobs`` for these tokens; ``offset`` is where their text starts."""
    pieces = token_pieces(tokenizer, token_ids)
    offsets = []
    for piece in pieces:
        offsets.append(offset)
        offset += len(piece)
    return {"tokens": pieces, "token_logprobs": logprobs, "top_logprobs": None, "text_offset": offsets}


def chat_logprobs(tokenizer, token_ids: list[int], logprobs: list[float]) -> dict:
    pieces = token_pieces(tokenizer, token_ids)
    return {
        "content": [
            {"token": p, "logprob": lp, "bytes": list(p.encode("utf-8")), "top_logprobs": []}
            for p, lp in zip(pieces, logprobs, strict=True)
        ]
    }


class ResponseBuilder:
    """Fixed id/created/model for all chunks of one response."""

    def __init__(self, kind: str, response_id: str, model: str) -> None:
        self.kind = kind  # "completion" | "chat"
        self.id = response_id
        self.model = model
        self.created = int(time.time())

    def _envelope(self, obj: str, choices: list[dict]) -> dict:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    # --- whole responses --------------------------------------------------------------------
    def final(self, choices: list[Choice], usage: dict, tokenizer, want_logprobs: bool) -> dict:
        if self.kind == "completion":
            items = [
                {
                    "index": c.index,
                    "text": c.text,
                    "logprobs": completion_logprobs(tokenizer, c.token_ids, c.logprobs, 0)
                    if want_logprobs
                    else None,
                    "finish_reason": c.finish_reason,
                }
                for c in choices
            ]
            body = self._envelope("text_completion", items)
        else:
            items = [
                {
                    "index": c.index,
                    "message": {"role": "assistant", "content": c.text},
                    "logprobs": chat_logprobs(tokenizer, c.token_ids, c.logprobs) if want_logprobs else None,
                    "finish_reason": c.finish_reason,
                }
                for c in choices
            ]
            body = self._envelope("chat.completion", items)
        body["usage"] = usage
        return body

    # --- stream chunks ----------------------------------------------------------------------
    def chunk(self, choice_item: dict, with_usage_field: bool) -> str:
        obj = "text_completion" if self.kind == "completion" else "chat.completion.chunk"
        body = self._envelope(obj, [choice_item])
        if with_usage_field:
            body["usage"] = None
        return sse(body)

    def usage_chunk(self, usage: dict) -> str:
        obj = "text_completion" if self.kind == "completion" else "chat.completion.chunk"
        body = self._envelope(obj, [])
        body["usage"] = usage
        return sse(body)
