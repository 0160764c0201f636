"""OpenAI-compatible routes: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``.

Each generation route validates, resolves the model to an adapter, tokenizes (off the event loop)
and hands a :class:`GenerationJob` to :func:`respond`, which serves it whole or as SSE. A client
that goes away - streaming or not - aborts its engine requests, freeing their KV blocks at once.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from server.api.auth import Principal, require_key
from server.api.errors import APIError
from server.api.generation import ClientDisconnected, GenerationJob, RequestGroup, raise_if_failed
from server.api.openai_format import DONE, ResponseBuilder, chat_logprobs, completion_logprobs, sse
from server.api.schemas import ChatCompletionRequest, CompletionRequest, _SamplingFields
from server.api.state import AppState, app_state
from server.engine.types import RequestOutput, SamplingParams, check_context_length
from server.lora.ref import AdapterRef
from server.service.resolve import not_found

if TYPE_CHECKING:
    from server.bootstrap import Runtime
    from server.engine.async_engine import AsyncEngine

router = APIRouter(tags=["openai"])

_CLIENT_CLOSED = 499  # nginx's "client closed request": logged, never seen by the (gone) client


@router.get("/v1/models")
async def list_models(
    state: AppState = Depends(app_state), principal: Principal = Depends(require_key)
) -> JSONResponse:
    rt = state.ready_runtime()
    created = int(time.time())
    base = rt.engine.served
    resident = set(rt.engine.stats().resident_adapters)
    entry = {"object": "model", "created": created, "owned_by": "loraplex"}
    data = [
        {"id": base.name, **entry, "root": base.name, "parent": None, "max_model_len": base.max_model_len}
    ]
    for name in rt.adapters.names():
        if principal.can_use(name):
            data.append(
                {"id": name, **entry, "root": name, "parent": base.name, "resident": name in resident}
            )
    return JSONResponse({"object": "list", "data": data})


def resolve_adapter(
    rt: Runtime, principal: Principal, body: _SamplingFields
) -> tuple[AdapterRef | None, list[str]]:
    """The weights the request asks for, and its labels for the per-adapter request counter.

    A name the key may not use is reported exactly like a missing one, so tenants cannot probe
    each other's adapter names.
    """
    base = rt.engine.served.name
    names = list(body.adapters) if body.adapters else [body.model]
    for name in names:
        if name != base and not principal.can_use(name):
            raise not_found(name, "adapters" if body.adapters else "model")
    ref = rt.adapters.resolve(body.model, body.adapters)
    return ref, [n if n != base else "" for n in names]


@dataclass
class Caller:
    """What every generation route needs besides its body: the connection (to notice a client going
    away), the app's state, and whose key it is."""

    request: Request
    state: AppState
    principal: Principal


def caller(
    request: Request, state: AppState = Depends(app_state), principal: Principal = Depends(require_key)
) -> Caller:
    return Caller(request, state, principal)


@router.post("/v1/completions")
async def completions(body: CompletionRequest, ctx: Caller = Depends(caller)) -> Response:
    rt = ctx.state.ready_runtime()
    adapter, labels = resolve_adapter(rt, ctx.principal, body)
    prompts = []
    for prompt in body.prompt_list():
        if isinstance(prompt, str):
            prompt = await ctx.state.on_tokenizer_thread(rt.engine.served.tokenizer.encode, prompt)
        prompts.append(list(prompt))
    max_tokens = check_context_length(
        rt.engine.served.max_model_len, [len(p) for p in prompts], body.max_tokens
    )
    want_logprobs = body.logprobs is not None
    job = GenerationJob(prompts, sampling_params(body, max_tokens, want_logprobs), body.n, adapter, labels)
    builder = ResponseBuilder("completion", f"cmpl-{uuid.uuid4().hex}", body.model)
    return await respond(ctx, rt.engine, job, builder, body, want_logprobs)


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, ctx: Caller = Depends(caller)) -> Response:
    rt = ctx.state.ready_runtime()
    served = rt.engine.served
    adapter, labels = resolve_adapter(rt, ctx.principal, body)
    if not getattr(served.tokenizer, "chat_template", None):
        raise APIError(
            400,
            f"model '{served.name}' has no chat template in its tokenizer; use /v1/completions",
            param="messages",
        )
    messages = [
        {"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})} for m in body.messages
    ]
    prompt = await ctx.state.on_tokenizer_thread(_render_chat, served.tokenizer, messages)
    max_tokens = check_context_length(served.max_model_len, [len(prompt)], body.token_limit())
    job = GenerationJob([prompt], sampling_params(body, max_tokens, body.logprobs), body.n, adapter, labels)
    builder = ResponseBuilder("chat", f"chatcmpl-{uuid.uuid4().hex}", body.model)
    return await respond(ctx, rt.engine, job, builder, body, body.logprobs)


def _render_chat(tokenizer, messages: list[dict]) -> list[int]:
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # jinja's raise_exception() and template errors: the messages' fault
        raise APIError(400, f"chat template rejected the messages: {exc}", param="messages") from None
    return tokenizer.encode(text, add_special_tokens=False)


def sampling_params(body: _SamplingFields, max_tokens: int, logprobs: bool) -> SamplingParams:
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=max(body.top_k, 0),
            seed=body.seed,
            stop=body.stop_list(),
            stop_token_ids=list(body.stop_token_ids or []),
            ignore_eos=body.ignore_eos,
            logprobs=logprobs,
        )
    except ValueError as exc:
        raise APIError(400, str(exc)) from None


async def respond(
    ctx: Caller,
    engine: AsyncEngine,
    job: GenerationJob,
    builder: ResponseBuilder,
    body: _SamplingFields,
    want_logprobs: bool,
) -> Response:
    request = ctx.request
    group = RequestGroup(engine, ctx.state.metrics, builder.id)
    tokenizer = None if body.return_tokens_as_token_ids else engine.served.tokenizer
    await group.open(job)
    if not body.stream:
        try:
            choices = await group.run_to_completion(request)
        except ClientDisconnected:
            return Response(status_code=_CLIENT_CLOSED)
        finally:
            group.close()
        return JSONResponse(builder.final(choices, group.usage(), tokenizer, want_logprobs))
    try:
        primed = await group.prime(request)
    except ClientDisconnected:
        group.close()
        return Response(status_code=_CLIENT_CLOSED)
    except BaseException:
        group.close()
        raise
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    events = _sse_events(group, primed, builder, tokenizer, include_usage, want_logprobs)
    return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _sse_events(
    group: RequestGroup,
    primed: list,
    builder: ResponseBuilder,
    tokenizer,
    include_usage: bool,
    want_logprobs: bool,
) -> AsyncIterator[str]:
    """The SSE body; its ``finally`` runs when the client disconnects (Starlette cancels us)."""
    offsets = {c.index: 0 for c in group.choices}

    def render(choice, out: RequestOutput) -> str | None:
        has_tokens = want_logprobs and bool(out.new_token_ids)
        if not (out.new_text or out.finished or has_tokens):
            return None  # text held back (partial UTF-8 or a possible stop string)
        reason = choice.finish_reason if out.finished else None
        if builder.kind == "completion":
            logprobs = None
            if has_tokens:
                logprobs = completion_logprobs(
                    tokenizer, out.new_token_ids, out.logprobs or [], offsets[choice.index]
                )
            offsets[choice.index] += len(out.new_text)
            item = {
                "index": choice.index,
                "text": out.new_text,
                "logprobs": logprobs,
                "finish_reason": reason,
            }
        else:
            logprobs = chat_logprobs(tokenizer, out.new_token_ids, out.logprobs or []) if has_tokens else None
            delta = {"content": out.new_text} if out.new_text else {}
            item = {"index": choice.index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
        return builder.chunk(item, include_usage)

    try:
        if builder.kind == "chat":
            for c in group.choices:
                role = {"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None}
                yield builder.chunk({**role, "finish_reason": None}, include_usage)
        for choice, out in primed:
            if (chunk := render(choice, out)) is not None:
                yield chunk
        while not group.done:
            choice, out = await group.next_event()
            raise_if_failed(choice)
            if (chunk := render(choice, out)) is not None:
                yield chunk
        if include_usage:
            yield builder.usage_chunk(group.usage())
        yield DONE
    except APIError as exc:  # a step or adapter failure after the headers went out
        yield sse(exc.body())
        yield DONE
    finally:
        group.close()
