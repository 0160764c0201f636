"""OpenAI response shapes for completions and chat completions, whole and as SSE chunks.

Kept apart from the routes so both routes build identical ``usage``, ``logprobs`` and chunk framing.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from server.api.generation import Choice, TokenRun

DONE = "data: [DONE]\n\n"


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'), ensure_ascii=False)}\n\n"


@dataclass(frozen=True)
class Rendering:
    """How a request's tokens are shown: which logprobs, and whether completions echo the prompt."""

    tokenizer: object | None  # None: tokens as 'token_id:<id>' (vLLM's return_tokens_as_token_ids)
    logprobs: bool = False
    top_logprobs: int = 0
    echo: bool = False  # completions: the prompt (and its logprobs) before the output

    def pieces(self, token_ids: list[int]) -> list[str]:
        """Each token decoded on its own (what OpenAI's ``tokens`` / ``token`` fields show); exact as
        ``token_id:<id>`` where single-token decoding is not (partial UTF-8 bytes)."""
        if self.tokenizer is None:
            return [f"token_id:{t}" for t in token_ids]
        return [self.tokenizer.decode([t], skip_special_tokens=False) for t in token_ids]


def completion_logprobs(render: Rendering, run: TokenRun, offset: int) -> dict:
    """Legacy completions ``logprobs`` for these tokens; ``offset`` is where their text starts.

    ``top_logprobs`` holds the k likeliest tokens and, as OpenAI promises, the sampled one too.
    """
    pieces = render.pieces(run.token_ids)
    offsets = []
    for piece in pieces:
        offsets.append(offset)
        offset += len(piece)
    top = None
    if render.top_logprobs:
        top = []
        for piece, lp, alts in zip(pieces, run.logprobs, run.top, strict=True):
            if alts is None:
                top.append(None)
                continue
            names = render.pieces([t for t, _ in alts])
            top.append({piece: lp, **dict(zip(names, (v for _, v in alts), strict=True))})
    return {"tokens": pieces, "token_logprobs": run.logprobs, "top_logprobs": top, "text_offset": offsets}


def chat_logprobs(render: Rendering, run: TokenRun) -> dict:
    def entry(piece: str, lp: float) -> dict:
        return {"token": piece, "logprob": lp, "bytes": list(piece.encode("utf-8"))}

    content = []
    for piece, lp, alts in zip(render.pieces(run.token_ids), run.logprobs, run.top, strict=True):
        names = render.pieces([t for t, _ in alts or []])
        top = [entry(n, v) for n, (_, v) in zip(names, alts or [], strict=True)]
        content.append({**entry(piece, lp), "top_logprobs": top})
    return {"content": content}


class ResponseBuilder:
    """Fixed id/created/model for all chunks of one response."""

    def __init__(self, kind: str, response_id: str, model: str, render: Rendering) -> None:
        self.kind = kind  # "completion" | "chat"
        self.id = response_id
        self.model = model
        self.render = render
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
    def final(self, choices: list[Choice], usage: dict, prompts: list[EchoedPrompt]) -> dict:
        if self.kind == "completion":
            items = [self.completion_item(c, prompts[c.prompt_index]) for c in choices]
            body = self._envelope("text_completion", items)
        else:
            items = [
                {
                    "index": c.index,
                    "message": {"role": "assistant", "content": c.text},
                    "logprobs": chat_logprobs(self.render, c.output_run()) if self.render.logprobs else None,
                    "finish_reason": c.finish_reason,
                }
                for c in choices
            ]
            body = self._envelope("chat.completion", items)
        body["usage"] = usage
        return body

    def completion_item(self, c: Choice, prompt: EchoedPrompt) -> dict:
        run, text = c.output_run(), c.text
        if self.render.echo:
            run, text = c.prompt_run(prompt.token_ids) + run, prompt.text + text
        logprobs = completion_logprobs(self.render, run, 0) if self.render.logprobs else None
        return {"index": c.index, "text": text, "logprobs": logprobs, "finish_reason": c.finish_reason}

    # --- stream chunks ----------------------------------------------------------------------
    def chunk(self, choice_item: dict, usage: dict | None, with_usage_field: bool) -> str:
        obj = "text_completion" if self.kind == "completion" else "chat.completion.chunk"
        body = self._envelope(obj, [choice_item])
        if with_usage_field:
            body["usage"] = usage
        return sse(body)

    def usage_chunk(self, usage: dict) -> str:
        obj = "text_completion" if self.kind == "completion" else "chat.completion.chunk"
        body = self._envelope(obj, [])
        body["usage"] = usage
        return sse(body)


@dataclass(frozen=True)
class EchoedPrompt:
    """A completion prompt as echoed: the text the client sent (or the ids decoded) and its ids."""

    text: str
    token_ids: list[int]
