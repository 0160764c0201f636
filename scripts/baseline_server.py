"""The naive multi-LoRA server a user without loraplex would write: the comparison baseline.

One PEFT ``PeftModel`` with every adapter loaded, behind FastAPI with loraplex's API shape
(``/v1/models``, ``/v1/completions`` with SSE streaming and ``include_usage``, ``/v1/adapters`` multipart
upload and listing, ``/health``, ``/ready``), so the same load generator drives both. Each request takes
a lock, switches the active adapter with ``set_adapter`` (or disables adapters for the base model) and
runs ``model.generate`` alone: no batching across requests, no adapter mixing within a batch.

It is deliberately not a strawman: it streams token by token (a per-token streamer, not
``TextIteratorStreamer``'s word buffering), uses the KV cache inside ``generate``, runs generation off
the event loop, and honours greedy/temperature/top_p/ignore_eos like the real server.

    python scripts/baseline_server.py --model models/demo --adapter name=path ... --port 8100
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.generation.streamers import BaseStreamer


class CompletionBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    prompt: str | list[int]
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = None
    ignore_eos: bool = False
    stream: bool = False
    stream_options: dict | None = None


class _TokenStreamer(BaseStreamer):
    """Hands every generated token id to the event loop as soon as ``generate`` produces it."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> None:
        self.loop, self.queue = loop, queue
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate() first "streams" the prompt
            self._prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            self.loop.call_soon_threadsafe(self.queue.put_nowait, int(token))

    def end(self) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, None)


class BaselineModel:
    """PEFT model + adapters; :meth:`generate` runs one request at a time (the lock)."""

    def __init__(self, model_dir: Path, device: str = "cpu") -> None:
        self.name = Path(model_dir).resolve().name
        self.device = device
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
        self.adapters: dict[str, Path] = {}
        self.lock = threading.Lock()

    def add_adapter(self, name: str, path: Path) -> None:
        from peft import PeftModel

        with self.lock:
            if not self.adapters:
                self.model = PeftModel.from_pretrained(self.model, path, adapter_name=name).eval()
            else:
                self.model.load_adapter(path, adapter_name=name)
            self.adapters[name] = Path(path)

    def generate(self, ids: list[int], body: CompletionBody, adapter: str | None, streamer) -> list[int]:
        kwargs = dict(
            max_new_tokens=body.max_tokens, streamer=streamer, pad_token_id=self.tokenizer.eos_token_id
        )
        if body.ignore_eos:
            kwargs["min_new_tokens"] = body.max_tokens
        if body.temperature == 0:
            kwargs["do_sample"] = False
        else:
            kwargs.update(do_sample=True, temperature=body.temperature, top_p=body.top_p)
        with self.lock, torch.inference_mode():
            if body.seed is not None:
                torch.manual_seed(body.seed)
            if adapter is None:
                ctx = self.model.disable_adapter() if self.adapters else contextlib.nullcontext()
            else:
                self.model.set_adapter(adapter)  # the per-request switch
                ctx = contextlib.nullcontext()
            with ctx:
                out = self.model.generate(input_ids=torch.tensor([ids], device=self.device), **kwargs)
        return out[0, len(ids) :].tolist()


def _error(status: int, message: str) -> JSONResponse:
    body = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": status}}
    return JSONResponse(body, status_code=status)


def create_app(base: BaselineModel) -> FastAPI:
    app = FastAPI(title="naive multi-LoRA baseline")

    @app.exception_handler(HTTPException)
    async def _http_error(_: Request, exc: HTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail))

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> dict:
        return {"status": "ready", "model": base.name}

    @app.get("/v1/models")
    async def models() -> dict:
        data = [{"id": base.name, "object": "model", "parent": None}]
        data += [{"id": n, "object": "model", "parent": base.name} for n in sorted(base.adapters)]
        return {"object": "list", "data": data}

    @app.get("/v1/adapters")
    async def adapters() -> dict:
        return {"object": "list", "data": [{"id": n, "object": "adapter"} for n in sorted(base.adapters)]}

    @app.post("/v1/adapters", status_code=201)
    async def upload(request: Request) -> dict:
        form = await request.form()
        name = str(form.get("name") or "")
        if not name or name in base.adapters:
            raise HTTPException(409 if name else 400, f"bad or duplicate adapter name {name!r}")
        target = Path(tempfile.mkdtemp(prefix=f"baseline-{name}-"))
        for fname in ("adapter_config.json", "adapter_model.safetensors"):
            upload = form.get(fname)
            if upload is None:
                raise HTTPException(400, f"missing file {fname}")
            (target / fname).write_bytes(await upload.read())
        await asyncio.to_thread(base.add_adapter, name, target)
        return {"id": name, "object": "adapter"}

    @app.post("/v1/completions")
    async def completions(body: CompletionBody):
        if body.model == base.name:
            adapter = None
        elif body.model in base.adapters:
            adapter = body.model
        else:
            raise HTTPException(404, f"The model `{body.model}` does not exist.")
        prompt = body.prompt if isinstance(body.prompt, list) else base.tokenizer.encode(body.prompt)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        job = asyncio.create_task(
            asyncio.to_thread(base.generate, prompt, body, adapter, _TokenStreamer(loop, queue))
        )
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(text: str, finish: str | None) -> str:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            return f"data: {json.dumps({'id': rid, 'object': 'text_completion', 'created': created, 'model': body.model, 'choices': [choice]})}\n\n"

        def finish_reason(tokens: list[int]) -> str:
            eos = base.tokenizer.eos_token_id
            return "stop" if tokens and tokens[-1] == eos and len(tokens) < body.max_tokens else "length"

        if not body.stream:
            tokens = await job
            text = base.tokenizer.decode(tokens, skip_special_tokens=True)
            usage = {"prompt_tokens": len(prompt), "completion_tokens": len(tokens)}
            usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason(tokens)}
            return {"id": rid, "object": "text_completion", "created": created, "model": body.model,
                    "choices": [choice], "usage": usage}  # fmt: skip

        async def events() -> AsyncIterator[str]:
            tokens: list[int] = []
            sent = ""
            while (token := await queue.get()) is not None:
                tokens.append(token)
                text = base.tokenizer.decode(tokens, skip_special_tokens=True)
                if text.endswith("\ufffd"):
                    continue  # an incomplete UTF-8 sequence; wait for the next token
                yield chunk(text[len(sent) :], None)
                sent = text
            await job
            yield chunk("", finish_reason(tokens))
            if body.stream_options and body.stream_options.get("include_usage"):
                usage = {"prompt_tokens": len(prompt), "completion_tokens": len(tokens),
                         "total_tokens": len(prompt) + len(tokens)}  # fmt: skip
                yield f"data: {json.dumps({'id': rid, 'model': body.model, 'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    base = BaselineModel(args.model, args.device)
    for item in args.adapter:
        name, _, path = item.partition("=")
        base.add_adapter(name, Path(path))
    import uvicorn

    uvicorn.run(create_app(base), host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
