"""A vLLM user switches by changing the URL: the official ``openai`` client and the requests
``vllm bench serve`` sends (streaming with ``stream_options.include_usage``, ``ignore_eos``,
``max_tokens``, text and token-id prompts), parsed exactly as vLLM's benchmark parses them, against a
live server on a model like the benchmark's (a word-level vocabulary whose decoder puts spaces
between tokens) with adapters."""

from __future__ import annotations

import asyncio
import json
import shutil

import httpx
import openai
import pytest

from server.config import Settings
from server.model.synthetic import make_random_model, model_config, word_tokenizer
from tests.api_harness import CHAT_TEMPLATE, LiveServer
from tests.lora_fixtures import ATTENTION, make_peft_adapter

BASE = "bench-like"
ADAPTERS = ["lora-a", "lora-b"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm_compat")
    config = model_config("llama", "tiny")
    tokenizer = word_tokenizer(config.vocab_size)
    tokenizer.chat_template = CHAT_TEMPLATE
    model_dir = make_random_model(root / "model", config, tokenizer, seed=0, weight_std=0.08)
    for seed, name in enumerate(ADAPTERS, start=1):
        made = make_peft_adapter(model_dir, root / "made" / name, r=4, target_modules=ATTENTION, seed=seed)
        shutil.copytree(made, root / "store" / name)
    settings = Settings(model=model_dir, served_model_name=BASE, adapter_store=root / "store", device="cpu",
                        num_kv_blocks=256, max_model_len=256)  # fmt: skip
    with LiveServer(settings) as srv:
        yield srv


async def bench_completion(url: str, model: str, prompt, output_len: int) -> dict:
    """``vllm bench serve --backend openai``: its payload, and its stream parser (text, then usage)."""
    payload = {
        "model": model,
        "prompt": prompt,
        "repetition_penalty": 1.0,
        "max_tokens": output_len,
        "logprobs": None,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
        "temperature": 0.0,  # what `--temperature 0` adds through the benchmark's extra_body
    }
    return await _bench_stream(f"{url}/v1/completions", payload, lambda choice: choice.get("text"))


async def bench_chat(url: str, model: str, prompt: str, output_len: int) -> dict:
    """``vllm bench serve --backend openai-chat``."""
    payload = {
        "model": model,
        "messages": [{"role": "user", "content": [{"type": "text", "text": prompt}]}],
        "temperature": 0.0,
        "max_completion_tokens": output_len,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }
    return await _bench_stream(
        f"{url}/v1/chat/completions", payload, lambda choice: choice["delta"].get("content")
    )


async def _bench_stream(url: str, payload: dict, text_of) -> dict:
    out = {"generated_text": "", "output_tokens": None, "chunks": 0}
    async with httpx.AsyncClient(timeout=120) as client, client.stream("POST", url, json=payload) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            line = line.strip()
            if not line or line.startswith(":"):
                continue
            chunk = line.removeprefix("data: ")
            if chunk == "[DONE]":
                out["done"] = True
                continue
            data = json.loads(chunk)
            if choices := data.get("choices"):
                out["generated_text"] += text_of(choices[0]) or ""
                out["chunks"] += 1
            elif usage := data.get("usage"):
                out["output_tokens"] = usage.get("completion_tokens")
    return out


def test_vllm_bench_serve_requests_run_unchanged(server):
    """Completions (text and token-id prompts) and chat, for the base and every adapter, all at once:
    every stream ends with usage (completion_tokens == max_tokens under ignore_eos) and [DONE], and
    its text is the non-streamed answer's."""
    models = [BASE, *ADAPTERS]
    jobs = [(m, p) for m in models for p in ("t5 t7 t9 t11", [5, 7, 9, 11, 13, 15])]

    async def run():
        return await asyncio.gather(
            *[bench_completion(server.url, m, p, 12) for m, p in jobs],
            *[bench_chat(server.url, m, "t20 t30 t40", 10) for m in models],
        )

    results = asyncio.run(run())
    for (model, prompt), res in zip(jobs, results, strict=False):
        assert res.get("done") and res["output_tokens"] == 12 and res["chunks"] >= 1, (model, prompt)
        body = dict(model=model, prompt=prompt, max_tokens=12, temperature=0, ignore_eos=True)
        whole = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).json()
        assert res["generated_text"] == whole["choices"][0]["text"], (model, prompt)
    for res in results[len(jobs) :]:
        assert res.get("done") and res["output_tokens"] == 10 and res["generated_text"]


def test_openai_client_streams_with_usage(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    extra = {"ignore_eos": True}
    stream = client.completions.create(
        model="lora-a", prompt="t3 t4 t5", max_tokens=9, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body=extra,
    )  # fmt: skip
    chunks = list(stream)
    assert chunks[-1].usage.completion_tokens == 9 and chunks[-1].choices == []
    assert all(c.usage is None for c in chunks[:-1])
    whole = client.completions.create(
        model="lora-a", prompt="t3 t4 t5", max_tokens=9, temperature=0, extra_body=extra
    )
    assert "".join(c.choices[0].text for c in chunks[:-1]) == whole.choices[0].text
    chat = client.chat.completions.create(
        model="lora-b", messages=[{"role": "user", "content": "t8 t9"}], max_tokens=6, temperature=0,
        stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True}, extra_body=extra,
    )  # fmt: skip
    chat_chunks = list(chat)
    counts = [c.usage.completion_tokens for c in chat_chunks if c.choices]
    assert counts == sorted(counts) and counts[-1] == 6  # usage so far, in every chunk
    assert chat_chunks[-1].usage.completion_tokens == 6
    tokens = httpx.post(f"{server.url}/tokenize", json={"model": BASE, "prompt": "t8 t9"}).json()
    assert tokens["tokens"] == [8, 9]
    assert httpx.post(f"{server.url}/detokenize", json={"tokens": [8, 9]}).json() == {"prompt": "t8 t9"}


@pytest.mark.parametrize("prompt", ["t5 t7 t9", [5, 7, 9], [1, 5, 6], "t40", [5] + [1] * 8])
def test_prompt_text_plus_completion_text_is_the_decoding_of_all_ids(server, prompt):
    """With a decoder that puts spaces between tokens, the first completion token keeps its space:
    what vLLM's ``echo`` shows is exactly the decoding of prompt + output ids."""
    tok = server.engine.served.tokenizer
    body = dict(model=BASE, prompt=prompt, max_tokens=6, temperature=0, ignore_eos=True, logprobs=0,
                return_tokens_as_token_ids=True)  # fmt: skip
    plain = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).json()["choices"][0]
    out_ids = [int(t.split(":")[1]) for t in plain["logprobs"]["tokens"]]
    prompt_ids = tok.encode(prompt) if isinstance(prompt, str) else prompt
    full = tok.decode(prompt_ids + out_ids, skip_special_tokens=True)
    echoed = httpx.post(f"{server.url}/v1/completions", json={**body, "echo": True}, timeout=60).json()
    assert echoed["choices"][0]["text"] == full
    prompt_text = prompt if isinstance(prompt, str) else tok.decode(prompt, skip_special_tokens=True)
    assert prompt_text + plain["text"] == full
    assert plain["text"].startswith(" ")
