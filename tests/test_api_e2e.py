"""The HTTP API end to end: uvicorn on 127.0.0.1, httpx and the official openai client, outputs
checked token for token against transformers + PEFT (the oracle)."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import httpx
import openai
import pytest

from server.config import Settings
from server.store import tree_digest
from tests.api_harness import (
    LiveServer,
    copy_model_with_chat_template,
    greedy_ids,
    peft_model,
    token_ids_of,
)
from tests.lora_fixtures import ATTENTION, MIXED_CASES, AdapterCase, make_peft_adapter

BASE = "tiny"
CASES = MIXED_CASES + [
    AdapterCase("attn-r8", dict(r=8, target_modules=ATTENTION, seed=8)),
    AdapterCase("mlp-r4", dict(r=4, target_modules=["gate_proj", "up_proj", "down_proj"], seed=9)),
]
PROMPTS = [[5, 77, 301, 12, 9], [400, 3, 58, 222, 19, 87, 140, 66, 31]]
NEW = 8


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_llama_dir):
    root = tmp_path_factory.mktemp("api_e2e")
    model_dir = copy_model_with_chat_template(tiny_llama_dir, root / "model")
    made = root / "made"
    adapters = {c.name: make_peft_adapter(model_dir, made / c.name, **c.kwargs) for c in CASES}
    store = root / "store"
    store.mkdir()
    for name, path in adapters.items():
        shutil.copytree(path, store / name)
    (root / "allowed").mkdir()
    return dict(root=root, model_dir=model_dir, adapters=adapters, store=store)


@pytest.fixture(scope="module")
def server(env):
    settings = Settings(
        model=env["model_dir"],
        served_model_name=BASE,
        adapter_store=env["store"],
        export_dir=env["root"] / "exports",
        allowed_lora_roots=[env["root"] / "allowed"],
        device="cpu",
        max_loras=4,  # fewer slots than adapters: mixed batches must rotate slots
        num_kv_blocks=512,
        max_model_len=256,
        max_body_bytes=64 * 1024,
    )
    with LiveServer(settings) as srv:
        yield srv


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


_ORACLE: dict = {}


def oracle(env, adapter: str | None, prompt: list[int], weights: dict[str, float] | None = None) -> list[int]:
    key = (adapter, tuple(prompt), tuple(sorted((weights or {}).items())))
    if key not in _ORACLE:
        if weights:
            model = peft_model(env["model_dir"], {n: env["adapters"][n] for n in weights}, weights)
        else:
            model = peft_model(env["model_dir"], {adapter: env["adapters"][adapter]} if adapter else None)
        _ORACLE[key] = greedy_ids(model, prompt, NEW)
    return _ORACLE[key]


def greedy_body(model: str, prompt, **extra) -> dict:
    return dict(
        model=model,
        prompt=prompt,
        max_tokens=NEW,
        temperature=0,
        ignore_eos=True,
        logprobs=0,
        return_tokens_as_token_ids=True,
        **extra,
    )


def sse_events(response: httpx.Response) -> list:
    events = []
    for line in response.iter_lines():
        if not line:
            continue
        assert line.startswith("data: "), line
        payload = line[len("data: ") :]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def test_models_lists_base_and_every_adapter(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {BASE} | {c.name for c in CASES}
    for case in CASES:
        card = models[case.name].model_dump()
        assert card["parent"] == BASE
        assert isinstance(card["resident"], bool)


@pytest.mark.parametrize("adapter", [None] + [c.name for c in CASES])
def test_completion_and_stream_match_peft(env, http, adapter):
    model = adapter or BASE
    want = oracle(env, adapter, PROMPTS[0])
    r = http.post("/v1/completions", json=greedy_body(model, PROMPTS[0]))
    assert r.status_code == 200, r.text
    body = r.json()
    choice = body["choices"][0]
    assert token_ids_of(choice["logprobs"]) == want
    assert choice["finish_reason"] == "length"
    usage = body["usage"]
    cached = usage.pop("prompt_tokens_details")["cached_tokens"]  # earlier tests may have cached it
    assert usage == {
        "prompt_tokens": len(PROMPTS[0]),
        "completion_tokens": NEW,
        "total_tokens": len(PROMPTS[0]) + NEW,
    }
    assert 0 <= cached < len(PROMPTS[0])

    stream_body = greedy_body(model, PROMPTS[0], stream=True, stream_options={"include_usage": True})
    with http.stream("POST", "/v1/completions", json=stream_body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    usage_chunk = events[-2]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == NEW
    chunks = [e["choices"][0] for e in events[:-2]]
    assert "".join(c["text"] for c in chunks) == choice["text"]
    assert [i for c in chunks if c["logprobs"] for i in token_ids_of(c["logprobs"])] == want
    assert chunks[-1]["finish_reason"] == "length"
    assert all(c["finish_reason"] is None for c in chunks[:-1])


def test_mixed_concurrent_requests_over_all_adapters(env, server):
    """Every adapter (more than the 4 device slots) and the base, two prompts each, all at once."""
    jobs = [(a, p) for a in [None] + [c.name for c in CASES] for p in PROMPTS]
    wants = [oracle(env, a, p) for a, p in jobs]

    async def run():
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        async with client:
            return await asyncio.gather(
                *[
                    client.completions.create(
                        model=a or BASE,
                        prompt=p,
                        max_tokens=NEW,
                        temperature=0,
                        logprobs=0,
                        extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True},
                    )
                    for a, p in jobs
                ]
            )

    results = asyncio.run(run())
    for (adapter, prompt), want, res in zip(jobs, wants, results, strict=True):
        assert token_ids_of(res.choices[0].logprobs.model_dump()) == want, (adapter, prompt)


def test_weighted_composition_matches_peft_cat(env, http):
    single = {"attn-r4": 1.0}
    r = http.post("/v1/completions", json=greedy_body(BASE, PROMPTS[1], adapters=single))
    assert r.status_code == 200, r.text
    assert token_ids_of(r.json()["choices"][0]["logprobs"]) == oracle(env, "attn-r4", PROMPTS[1])

    weights = {"attn-r4": 0.7, "all-r8-rslora": 0.3}
    r = http.post("/v1/completions", json=greedy_body(BASE, PROMPTS[1], adapters=weights))
    assert r.status_code == 200, r.text
    assert token_ids_of(r.json()["choices"][0]["logprobs"]) == oracle(env, None, PROMPTS[1], weights)

    r = http.post("/v1/completions", json=greedy_body(BASE, PROMPTS[1], adapters={"../x": 1.0}))
    assert r.status_code == 400 and r.json()["error"]["param"] == "adapters"
    r = http.post("/v1/completions", json=greedy_body(BASE, PROMPTS[1], adapters={"nope": 1.0}))
    assert r.status_code == 404


def test_chat_with_openai_client_stream_and_whole(env, server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Hello there"}]
    extra = {"ignore_eos": True}
    whole = client.chat.completions.create(
        model="attn-r4", messages=messages, max_tokens=NEW, temperature=0, extra_body=extra
    )
    tokenizer = server.engine.served.tokenizer
    prompt_ids = tokenizer.encode(
        tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
        add_special_tokens=False,
    )
    assert whole.usage.prompt_tokens == len(prompt_ids)
    assert whole.usage.completion_tokens == NEW
    assert whole.choices[0].message.role == "assistant"
    assert whole.choices[0].finish_reason == "length"
    want = oracle(env, "attn-r4", prompt_ids)
    assert whole.choices[0].message.content == tokenizer.decode(want, skip_special_tokens=True)

    stream = client.chat.completions.create(
        model="attn-r4", messages=messages, max_tokens=NEW, temperature=0, stream=True, extra_body=extra
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"


def test_n_choices_and_seeds(http):
    body = dict(
        model="attn-r8", prompt="The quick brown", max_tokens=6, temperature=1.0, seed=5, n=3, ignore_eos=True
    )
    first = http.post("/v1/completions", json=body).json()
    again = http.post("/v1/completions", json=body).json()
    texts = [c["text"] for c in first["choices"]]
    assert [c["index"] for c in first["choices"]] == [0, 1, 2]
    assert texts == [c["text"] for c in again["choices"]]
    assert first["usage"]["completion_tokens"] == 18
    for i in range(3):  # choice i is sampled with seed + i
        single = http.post("/v1/completions", json={**body, "n": 1, "seed": 5 + i}).json()
        assert single["choices"][0]["text"] == texts[i]
    two_prompts = http.post("/v1/completions", json={**body, "prompt": ["a b", "c d"], "n": 2}).json()
    assert len(two_prompts["choices"]) == 4


def test_stop_string_cuts_the_output(http):
    base = dict(model="mlp-r4", prompt="Once upon a time", max_tokens=24, temperature=0, ignore_eos=True)
    full = http.post("/v1/completions", json=base).json()["choices"][0]["text"]
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert stop.strip(), full
    cut = http.post("/v1/completions", json={**base, "stop": [stop]}).json()["choices"][0]
    assert cut["finish_reason"] == "stop"
    assert cut["text"] == full[: full.index(stop)]


def test_errors_are_openai_shaped(http):
    def err(r, status):
        assert r.status_code == status, r.text
        e = r.json()["error"]
        assert set(e) == {"message", "type", "param", "code"}
        return e

    assert (
        "does not exist"
        in err(http.post("/v1/completions", json={"model": "ghost", "prompt": "x"}), 404)["message"]
    )
    assert (
        err(http.post("/v1/completions", json={"model": "a/../../b", "prompt": "x"}), 404)["param"] == "model"
    )
    e = err(http.post("/v1/completions", json={"model": BASE, "prompt": "x", "max_tokens": 0}), 400)
    assert e["param"] == "max_tokens"
    e = err(http.post("/v1/completions", json={"model": BASE, "prompt": [1, 2, 3], "max_tokens": 300}), 400)
    assert "256" in e["message"] and "303" in e["message"]
    e = err(http.post("/v1/completions", json={"model": BASE, "prompt": [7] * 256}), 400)
    assert "256" in e["message"]
    err(http.post("/v1/completions", json={"model": BASE, "prompt": [1, 2, 99999]}), 400)
    err(http.post("/v1/completions", json={"model": BASE, "prompt": "x", "logprobs": 21}), 400)
    err(http.post("/v1/completions", json={"model": BASE, "prompt": ""}), 400)
    err(http.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"}), 400)
    err(http.post("/v1/completions", json={"model": BASE, "prompt": "x" * 70_000}), 413)
    err(http.get("/v1/nothing-here"), 404)
    err(http.delete("/v1/completions"), 405)


def test_store_api_upload_use_delete_reupload(env, http, tmp_path):
    listing = http.get("/v1/adapters").json()["data"]
    by_name = {a["id"]: a for a in listing}
    assert set(by_name) == {c.name for c in CASES}
    info = by_name["attn-r4"]
    assert info["digest"] == f"sha256:{tree_digest(env['store'] / 'attn-r4')}"
    assert info["rank"] == 4 and sorted(info["target_modules"]) == sorted(ATTENTION)
    assert info["size_bytes"] > 0 and info["parent"] == BASE
    served = http.get("/v1/adapters/attn-r4").json()["requests"]
    assert http.post("/v1/completions", json=greedy_body("attn-r4", PROMPTS[0])).status_code == 200
    assert http.get("/v1/adapters/attn-r4").json()["requests"] == served + 1  # this test's own request
    assert http.get("/v1/adapters/ghost").status_code == 404

    first = make_peft_adapter(env["model_dir"], tmp_path / "v1", r=4, seed=21)
    second = make_peft_adapter(env["model_dir"], tmp_path / "v2", r=4, seed=22)
    env["adapters"]["fresh"] = first

    def upload(src: Path):
        files = {
            "adapter_config.json": ("adapter_config.json", (src / "adapter_config.json").read_bytes()),
            "adapter_model.safetensors": (
                "adapter_model.safetensors",
                (src / "adapter_model.safetensors").read_bytes(),
            ),
        }
        return http.post("/v1/adapters", data={"name": "fresh"}, files=files)

    r = upload(first)
    assert r.status_code == 201, r.text
    uploaded = tmp_path / "uploaded"  # what was sent: the two files (PEFT also writes a README)
    uploaded.mkdir()
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(first / f, uploaded / f)
    assert r.json()["digest"] == f"sha256:{tree_digest(uploaded)}"
    assert upload(first).status_code == 409
    r = http.post("/v1/completions", json=greedy_body("fresh", PROMPTS[0]))
    assert token_ids_of(r.json()["choices"][0]["logprobs"]) == oracle(env, "fresh", PROMPTS[0])
    series = 'loraplex_adapter_requests_total{adapter="fresh"}'
    assert series in http.get("/metrics").text

    assert http.delete("/v1/adapters/fresh").json()["deleted"] is True
    assert not (env["store"] / "fresh").exists()
    assert series not in http.get("/metrics").text  # no series kept per deleted adapter name
    assert http.post("/v1/completions", json=greedy_body("fresh", PROMPTS[0])).status_code == 404
    assert http.delete("/v1/adapters/fresh").status_code == 404

    # Same name, new weights: the old host copy must not be served.
    assert upload(second).status_code == 201
    _ORACLE.pop(("fresh", tuple(PROMPTS[0]), ()), None)
    env["adapters"]["fresh"] = second
    r = http.post("/v1/completions", json=greedy_body("fresh", PROMPTS[0]))
    assert token_ids_of(r.json()["choices"][0]["logprobs"]) == oracle(env, "fresh", PROMPTS[0])
    assert http.delete("/v1/adapters/fresh").status_code == 200


def test_merge_exports_a_standalone_model(env, http):
    r = http.post("/v1/adapters/attn-r8/merge")
    assert r.status_code == 200, r.text
    out = Path(r.json()["path"])
    assert out.parent == (env["root"] / "exports").resolve()
    assert r.json()["digest"] == f"sha256:{tree_digest(out)}"
    merged = peft_model(out)
    assert greedy_ids(merged, PROMPTS[0], NEW) == oracle(env, "attn-r8", PROMPTS[0])
    assert http.post("/v1/adapters/ghost/merge").status_code == 404
    assert http.post("/v1/adapters/..%2Fx/merge").status_code in (400, 404)


def test_vllm_load_and_unload(env, http, tmp_path):
    allowed = env["root"] / "allowed"
    src = shutil.copytree(env["adapters"]["bias-r4"], allowed / "bias-copy")
    r = http.post("/v1/load_lora_adapter", json={"lora_name": "runtime", "lora_path": str(src)})
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'runtime' added successfully."
    r = http.post("/v1/completions", json=greedy_body("runtime", PROMPTS[0]))
    assert token_ids_of(r.json()["choices"][0]["logprobs"]) == oracle(env, "bias-r4", PROMPTS[0])
    assert "runtime" in {m["id"] for m in http.get("/v1/models").json()["data"]}

    again = http.post("/v1/load_lora_adapter", json={"lora_name": "runtime", "lora_path": str(src)})
    assert again.status_code == 400 and "load_inplace" in again.json()["error"]["message"]
    inplace = {"lora_name": "runtime", "lora_path": str(src), "load_inplace": True}
    assert http.post("/v1/load_lora_adapter", json=inplace).status_code == 200

    outside = shutil.copytree(env["adapters"]["bias-r4"], tmp_path / "outside")
    link = allowed / "sneaky"
    link.symlink_to(outside)
    for path, status in [
        (outside, 400),
        (link, 400),
        (allowed / "missing", 404),
        (allowed / ".." / "made", 400),
    ]:
        r = http.post("/v1/load_lora_adapter", json={"lora_name": "other", "lora_path": str(path)})
        assert r.status_code == status, (path, r.text)
    bad = allowed / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text("{}")
    r = http.post("/v1/load_lora_adapter", json={"lora_name": "other", "lora_path": str(bad)})
    assert r.status_code == 400
    assert http.post("/v1/completions", json=greedy_body("other", PROMPTS[0])).status_code == 404

    r = http.post("/v1/unload_lora_adapter", json={"lora_name": "runtime"})
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'runtime' removed successfully."
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": "runtime"}).status_code == 404
    assert http.post("/v1/completions", json=greedy_body("runtime", PROMPTS[0])).status_code == 404


def test_metrics_present_and_moving(http):
    def scrape() -> dict[str, float]:
        return _scrape(http)

    before = scrape()
    for name in ("vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc"):
        assert name in before
    assert any(k.startswith("vllm:lora_requests_info{") and 'max_lora="4"' in k for k in before)
    assert http.post("/v1/completions", json=greedy_body("dora-r8", PROMPTS[1])).status_code == 200
    after = scrape()

    def grew(key: str) -> bool:
        return after.get(key, 0) > before.get(key, 0)

    assert grew('loraplex_adapter_requests_total{adapter="dora-r8"}')
    assert grew("loraplex_generation_tokens_total")
    assert grew("loraplex_prompt_tokens_total")
    assert grew("loraplex_time_to_first_token_seconds_count")
    assert grew("loraplex_inter_token_latency_seconds_count")
    assert grew('loraplex_http_requests_total{route="/v1/completions",status="200"}')
    assert grew("loraplex_engine_steps_total")
    assert grew("loraplex_batched_tokens_total")
    assert grew("loraplex_scheduled_sequences_total")
    assert "loraplex_batch_size" in after
    assert after["loraplex_adapter_loads_total"] >= 1  # at least dora-r8 (more if earlier tests ran)


def test_repeated_prompt_reports_cached_tokens_per_adapter(env, http):
    """Prefix caching through the API: the same prompt again reuses its full KV blocks (16 tokens
    each), only under the same adapter, and the tokens stay the oracle's."""
    prompt = list(range(40, 80))  # 40 tokens: 2 full blocks can be reused, the rest is computed

    def run(model: str) -> tuple[list[int], int]:
        r = http.post("/v1/completions", json=greedy_body(model, prompt))
        assert r.status_code == 200, r.text
        body = r.json()
        return token_ids_of(body["choices"][0]["logprobs"]), body["usage"]["prompt_tokens_details"][
            "cached_tokens"
        ]

    hits_before = _scrape(http).get("vllm:prefix_cache_hits_total", 0)
    assert run(BASE) == (oracle(env, None, prompt), 0)
    assert run(BASE) == (oracle(env, None, prompt), 32)
    assert run("attn-r8") == (oracle(env, "attn-r8", prompt), 0)  # another adapter: its own K/V
    assert run("attn-r8") == (oracle(env, "attn-r8", prompt), 32)
    metrics = _scrape(http)
    assert metrics["vllm:prefix_cache_hits_total"] == hits_before + 64
    assert metrics["vllm:prefix_cache_queries_total"] >= 4 * len(prompt)
    assert 0 < metrics["loraplex_kv_cache_cached_free_perc"] <= 1


def _scrape(http) -> dict[str, float]:
    out = {}
    for line in http.get("/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out
