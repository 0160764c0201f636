"""vLLM's ``/tokenize`` and ``/detokenize``: the served tokenizer (and chat template), as vLLM answers.

Both run on the API's tokenizer thread. ``model``, when given, must be one the key may use, as for
generation (adapters share the base model's tokenizer).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from server.api.errors import APIError
from server.api.routes_openai import Caller, caller, render_chat
from server.api.schemas import DetokenizeRequest, TokenizeRequest
from server.service.resolve import not_found

if TYPE_CHECKING:
    from server.bootstrap import Runtime

router = APIRouter(tags=["tokenizer"])


def _runtime_for(ctx: Caller, model: str | None) -> Runtime:
    """The runtime, once ``model`` (if given) is one the key may use; unknown or forbidden: 404."""
    rt = ctx.state.ready_runtime()
    if model is not None and model != rt.engine.served.name:
        if not ctx.principal.can_use(model):
            raise not_found(model)
        rt.adapters.resolve(model)
    return rt


def _tokenize(tokenizer, body: TokenizeRequest) -> list[int]:
    if body.prompt is not None:
        add_special = True if body.add_special_tokens is None else body.add_special_tokens
        return tokenizer.encode(body.prompt, add_special_tokens=add_special)
    return render_chat(tokenizer, body.messages, bool(body.add_special_tokens), body.add_generation_prompt)


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, ctx: Caller = Depends(caller)) -> JSONResponse:
    rt = _runtime_for(ctx, body.model)
    tokenizer = rt.engine.served.tokenizer
    ids = await ctx.state.on_tokenizer_thread(_tokenize, tokenizer, body)
    strs = None
    if body.return_token_strs:
        strs = await ctx.state.on_tokenizer_thread(tokenizer.convert_ids_to_tokens, ids)
    limit = rt.engine.served.max_model_len
    return JSONResponse({"count": len(ids), "max_model_len": limit, "tokens": ids, "token_strs": strs})


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, ctx: Caller = Depends(caller)) -> JSONResponse:
    rt = _runtime_for(ctx, body.model)
    vocab = rt.engine.served.vocab_size
    if any(t >= vocab for t in body.tokens):
        raise APIError(400, f"token ids must be in [0, {vocab})", param="tokens")
    text = await ctx.state.on_tokenizer_thread(rt.engine.served.tokenizer.decode, body.tokens)
    return JSONResponse({"prompt": text})
