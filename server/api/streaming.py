"""One streaming generation request's SSE body: OpenAI chunks, the usage chunk, ``[DONE]``.

A completion with ``echo`` streams its prompt (and the prompt's logprobs) in each choice's first
chunk, as vLLM does. ``stream_options.include_usage`` adds the final usage chunk (and a ``usage``
field, null, to the others); ``continuous_usage_stats`` fills that field with the usage so far.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from server.api.errors import APIError
from server.api.generation import Choice, RequestGroup, TokenRun, raise_if_failed
from server.api.openai_format import (
    DONE,
    EchoedPrompt,
    ResponseBuilder,
    chat_logprobs,
    completion_logprobs,
    sse,
)
from server.api.schemas import StreamOptions
from server.engine.types import RequestOutput


class StreamRenderer:
    def __init__(
        self,
        group: RequestGroup,
        builder: ResponseBuilder,
        prompts: list[EchoedPrompt],
        options: StreamOptions,
    ) -> None:
        self.group = group
        self.builder = builder
        self.render = builder.render
        self.prompts = prompts
        self.options = options
        self.offsets = {c.index: 0 for c in group.choices}  # text streamed per choice (text_offset)
        self.echo_pending = {c.index for c in group.choices} if self.render.echo else set()

    async def events(self, primed: list[tuple[Choice, RequestOutput]]) -> AsyncIterator[str]:
        """The SSE body; its ``finally`` runs when the client disconnects (Starlette cancels us)."""
        group = self.group
        try:
            if self.builder.kind == "chat":
                for c in group.choices:
                    role = {"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None}
                    yield self._chunk({**role, "finish_reason": None})
            for choice, out in primed:
                if (item := self._item(choice, out)) is not None:
                    yield self._chunk(item)
            while not group.done:
                choice, out = await group.next_event()
                raise_if_failed(choice)
                if (item := self._item(choice, out)) is not None:
                    yield self._chunk(item)
            if self.options.include_usage:
                yield self.builder.usage_chunk(group.usage())
            yield DONE
        except APIError as exc:  # a step or adapter failure after the headers went out
            yield sse(exc.body())
            yield DONE
        finally:
            group.close()

    def _chunk(self, item: dict) -> str:
        usage = self.group.usage() if self.options.continuous_usage_stats else None
        with_field = self.options.include_usage or self.options.continuous_usage_stats
        return self.builder.chunk(item, usage, with_field)

    def _item(self, choice: Choice, out: RequestOutput) -> dict | None:
        """The choice's part of a chunk for this increment; None while its text is held back (partial
        UTF-8 or a possible stop string) and there is nothing else to say."""
        has_tokens = self.render.logprobs and bool(out.new_token_ids)
        echo = choice.index in self.echo_pending
        if not (out.new_text or out.finished or has_tokens or echo):
            return None
        reason = choice.finish_reason if out.finished else None
        run = TokenRun.of_output(out.new_token_ids, out.logprobs or [], out.top_logprobs or [])
        if self.builder.kind == "chat":
            logprobs = chat_logprobs(self.render, run) if has_tokens else None
            delta = {"content": out.new_text} if out.new_text else {}
            return {"index": choice.index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
        text = out.new_text
        if echo:
            self.echo_pending.discard(choice.index)
            prompt = self.prompts[choice.prompt_index]
            run, text = choice.prompt_run(prompt.token_ids) + run, prompt.text + text
        logprobs = None
        if self.render.logprobs and run.token_ids:
            logprobs = completion_logprobs(self.render, run, self.offsets[choice.index])
        self.offsets[choice.index] += len(text)
        return {"index": choice.index, "text": text, "logprobs": logprobs, "finish_reason": reason}
