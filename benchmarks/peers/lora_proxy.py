"""Adapter names for llama-server: ``python -m benchmarks.peers.lora_proxy --upstream URL --port P
--lora NAME=ID ...``.

``vllm bench serve --lora-modules`` spreads requests over adapters by putting an adapter's name in
the OpenAI ``model`` field, as vLLM and loraplex expect. llama-server ignores ``model`` and takes the
adapter from a ``lora: [{"id", "scale"}]`` field instead, so for its mixed-adapter runs this proxy
rewrites one into the other and streams the answer back unchanged. It adds one local hop to
llama.cpp's figures only (the benchmark drives base-model runs at llama-server directly).
"""

from __future__ import annotations

import argparse
import json

import httpx
import uvicorn


def rewrite(body: bytes, loras: dict[str, int], alias: str) -> bytes:
    """The request body with ``model: <adapter>`` turned into llama-server's ``lora`` field."""
    try:
        payload = json.loads(body)
    except ValueError:
        return body
    if isinstance(payload, dict) and payload.get("model") in loras:
        payload["lora"] = [{"id": loras[payload["model"]], "scale": 1.0}]
        payload["model"] = alias
    return json.dumps(payload).encode()


def make_app(upstream: str, loras: dict[str, int], alias: str = "bench"):
    client = httpx.AsyncClient(base_url=upstream, timeout=None, limits=httpx.Limits(max_connections=512))

    async def app(scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        request = client.build_request(
            scope["method"], scope["path"], content=rewrite(body, loras, alias) if body else None,
            headers={"content-type": "application/json"},
        )  # fmt: skip
        response = await client.send(request, stream=True)
        headers = [(k.encode(), v.encode()) for k, v in response.headers.items()
                   if k.lower() not in ("content-length", "transfer-encoding", "connection")]  # fmt: skip
        await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
        async for chunk in response.aiter_raw():
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await response.aclose()
        await send({"type": "http.response.body", "body": b""})

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--lora", action="append", default=[], help="NAME=ID, once per adapter")
    args = parser.parse_args()
    loras = {name: int(i) for name, i in (item.split("=", 1) for item in args.lora)}
    uvicorn.run(make_app(args.upstream, loras), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
