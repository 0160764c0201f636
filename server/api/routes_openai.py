"""OpenAI-compatible routes: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``.

Each generation route validates, resolves the model to an adapter, tokenizes (off the event loop)
and hands a :class:`GenerationJob` to :func:`respond`, which serves it whole or as SSE. A client
that goes away - streaming or not - aborts its engine requests, freeing their KV blocks at once.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from server.api.auth import Principal, require_key
from server.api.errors import APIError
from server.api.generation import ClientDisconnected, GenerationJob, RequestGroup
from server.api.openai_format import EchoedPrompt, Rendering, ResponseBuilder
from server.api.schemas import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    StreamOptions,
    _SamplingFields,
)
from server.api.state import AppState, app_state
from server.api.streaming import StreamRenderer
from server.engine.types import SamplingParams, check_context_length
from server.lora.ref import AdapterRef
from server.service.resolve import not_found
from server.structured.compiler import InvalidGrammarError

if TYPE_CHECKING:
    from server.bootstrap import Runtime
    from server.engine.async_engine import AsyncEngine
    from server.engine.structured import Grammar

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
    tokenizer = rt.engine.served.tokenizer
    prompts: list[EchoedPrompt] = []
    for prompt in body.prompt_list():
        if isinstance(prompt, str):
            encode = partial(tokenizer.encode, add_special_tokens=body.add_special_tokens)
            prompts.append(EchoedPrompt(prompt, await ctx.state.on_tokenizer_thread(encode, prompt)))
        else:
            text = await ctx.state.on_tokenizer_thread(_decode, tokenizer, prompt) if body.echo else ""
            prompts.append(EchoedPrompt(text, list(prompt)))
    ids = [p.token_ids for p in prompts]
    max_tokens = check_context_length(rt.engine.served.max_model_len, [len(p) for p in ids], body.max_tokens)
    want_logprobs = body.logprobs is not None
    render = Rendering(_token_namer(rt, body), want_logprobs, body.logprobs or 0, body.echo)
    params = await sampling_params(ctx, rt, body, max_tokens, render)
    job = GenerationJob(ids, params, body.n, adapter, labels)
    builder = ResponseBuilder("completion", f"cmpl-{uuid.uuid4().hex}", body.model, render)
    return await respond(ctx, rt.engine, job, builder, body, prompts)


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, ctx: Caller = Depends(caller)) -> Response:
    rt = ctx.state.ready_runtime()
    served = rt.engine.served
    adapter, labels = resolve_adapter(rt, ctx.principal, body)
    render_ids = partial(render_chat, served.tokenizer, body.messages, body.add_special_tokens)
    prompt = await ctx.state.on_tokenizer_thread(render_ids)
    max_tokens = check_context_length(served.max_model_len, [len(prompt)], body.token_limit())
    render = Rendering(_token_namer(rt, body), body.logprobs, body.top_logprobs or 0)
    params = await sampling_params(ctx, rt, body, max_tokens, render)
    job = GenerationJob([prompt], params, body.n, adapter, labels)
    builder = ResponseBuilder("chat", f"chatcmpl-{uuid.uuid4().hex}", body.model, render)
    return await respond(ctx, rt.engine, job, builder, body, [])


def _token_namer(rt: Runtime, body: _SamplingFields):
    """The tokenizer that names logprob tokens, or None for vLLM's ``token_id:<id>`` names."""
    return None if body.return_tokens_as_token_ids else rt.engine.served.tokenizer


def _decode(tokenizer, token_ids: list[int]) -> str:
    return tokenizer.decode(token_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def render_chat(
    tokenizer, messages: list[ChatMessage], add_special_tokens: bool, add_generation_prompt: bool = True
) -> list[int]:
    """The chat prompt's token ids: the messages through the tokenizer's chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise APIError(
            400, "the model's tokenizer has no chat template; use /v1/completions", param="messages"
        )
    rendered = [
        {"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})} for m in messages
    ]
    try:
        text = tokenizer.apply_chat_template(
            rendered, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as exc:  # jinja's raise_exception() and template errors: the messages' fault
        raise APIError(400, f"chat template rejected the messages: {exc}", param="messages") from None
    return tokenizer.encode(text, add_special_tokens=add_special_tokens)


async def compile_grammar(ctx: Caller, rt: Runtime, body: _SamplingFields) -> Grammar | None:
    """The request's output constraint compiled (cached; on the grammar thread), or a 400 naming it."""
    asked = body.grammar_request()
    if asked is None:
        return None
    field, spec = asked
    await ctx.state.on_tokenizer_thread(rt.grammars.prepare)
    try:
        return await rt.grammars.compile(spec)
    except InvalidGrammarError as exc:
        raise APIError(400, str(exc), param=field) from None


async def sampling_params(
    ctx: Caller, rt: Runtime, body: _SamplingFields, max_tokens: int, render: Rendering
) -> SamplingParams:
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=max(body.top_k, 0),
            min_p=body.min_p,
            seed=body.seed,
            stop=body.stop_list(),
            stop_token_ids=list(body.stop_token_ids or []),
            ignore_eos=body.ignore_eos,
            min_tokens=body.min_tokens,
            presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty,
            repetition_penalty=body.repetition_penalty,
            logit_bias=body.logit_bias_ids(),
            logprobs=render.logprobs,
            top_logprobs=render.top_logprobs,
            prompt_logprobs=render.echo and render.logprobs,
            grammar=await compile_grammar(ctx, rt, body),
        )
    except ValueError as exc:
        raise APIError(400, str(exc)) from None


async def respond(
    ctx: Caller,
    engine: AsyncEngine,
    job: GenerationJob,
    builder: ResponseBuilder,
    body: _SamplingFields,
    prompts: list[EchoedPrompt],
) -> Response:
    request = ctx.request
    group = RequestGroup(engine, ctx.state.metrics, builder.id)
    await group.open(job)
    if not body.stream:
        try:
            choices = await group.run_to_completion(request)
        except ClientDisconnected:
            return Response(status_code=_CLIENT_CLOSED)
        finally:
            group.close()
        return JSONResponse(builder.final(choices, group.usage(), prompts))
    try:
        primed = await group.prime(request)
    except ClientDisconnected:
        group.close()
        return Response(status_code=_CLIENT_CLOSED)
    except BaseException:
        group.close()
        raise
    events = StreamRenderer(group, builder, prompts, body.stream_options or StreamOptions()).events(primed)
    return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
