"""OpenAI / vLLM request fields end to end: each accepted one changes the output as documented,
each unsupported one is refused with a 400 naming it; structured outputs per request in mixed
batches over every adapter; /tokenize and /detokenize."""

from __future__ import annotations

import asyncio
import json
import shutil

import httpx
import jsonschema
import openai
import pytest

from server.api.schemas import UNSUPPORTED_SAMPLING
from server.config import Settings
from tests.api_harness import LiveServer, copy_model_with_chat_template, token_ids_of
from tests.lora_fixtures import MIXED_CASES, make_peft_adapter

BASE = "tiny"
ADAPTERS = [c.name for c in MIXED_CASES]
PROMPT = [5, 77, 301, 12, 9, 44]
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "count": {"type": "integer", "minimum": 0, "maximum": 99},
        "ok": {"type": "boolean"},
        "color": {"enum": ["red", "green", "blue"]},
    },
    "required": ["name", "count", "ok", "color"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_llama_dir):
    root = tmp_path_factory.mktemp("api_parity")
    model_dir = copy_model_with_chat_template(tiny_llama_dir, root / "model")
    for case in MIXED_CASES:
        shutil.copytree(
            make_peft_adapter(model_dir, root / "made" / case.name, **case.kwargs), root / "store" / case.name
        )
    settings = Settings(
        model=model_dir,
        served_model_name=BASE,
        adapter_store=root / "store",
        device="cpu",
        max_loras=4,  # fewer slots than adapters
        num_kv_blocks=512,
        max_model_len=256,
    )
    with LiveServer(settings) as srv:
        yield srv


@pytest.fixture(scope="module")
def http(server):
    with server.client() as client:
        yield client


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def complete(http, **fields) -> dict:
    body = dict(model=BASE, prompt=PROMPT, max_tokens=8, temperature=0, ignore_eos=True) | fields
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def test_completion_top_logprobs(http, client):
    choice = complete(http, logprobs=5, return_tokens_as_token_ids=True)
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 8
    for token, logprob, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"], strict=True):
        assert token in top and top[token] == logprob  # greedy: the sampled token is the likeliest
        assert len(top) == 5 and max(top.values()) == logprob
    res = client.completions.create(model=BASE, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=3)
    assert all(len(t) == 3 for t in res.choices[0].logprobs.top_logprobs)


def test_chat_top_logprobs_with_the_openai_client(client):
    messages = [{"role": "user", "content": "hello"}]
    res = client.chat.completions.create(
        model="attn-r4", messages=messages, max_tokens=5, temperature=0, logprobs=True, top_logprobs=4
    )
    content = res.choices[0].logprobs.content
    assert len(content) == res.usage.completion_tokens
    for item in content:
        assert len(item.top_logprobs) == 4
        assert item.top_logprobs[0].logprob == pytest.approx(item.logprob)
        assert [t.logprob for t in item.top_logprobs] == sorted(
            (t.logprob for t in item.top_logprobs), reverse=True
        )


def test_echo_prepends_the_prompt_and_its_logprobs(http, server):
    tok = server.engine.served.tokenizer
    plain = complete(http, prompt="Once upon a time")
    echoed = complete(http, prompt="Once upon a time", echo=True)
    assert echoed["text"] == "Once upon a time" + plain["text"]
    with_lp = complete(http, prompt=PROMPT, echo=True, logprobs=2, return_tokens_as_token_ids=True)
    lp = with_lp["logprobs"]
    ids = token_ids_of(lp)
    assert ids[: len(PROMPT)] == PROMPT and len(ids) == len(PROMPT) + 8
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert all(isinstance(v, float) for v in lp["token_logprobs"][1:])
    assert with_lp["text"] == tok.decode(ids, skip_special_tokens=True)
    # streamed: the prompt (and its logprobs) come in the first chunk
    body = dict(model=BASE, prompt=PROMPT, max_tokens=8, temperature=0, ignore_eos=True, echo=True,
                logprobs=2, return_tokens_as_token_ids=True, stream=True)  # fmt: skip
    with http.stream("POST", "/v1/completions", json=body) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert "".join(c["choices"][0]["text"] for c in chunks) == with_lp["text"]
    streamed = [
        i for c in chunks if c["choices"][0]["logprobs"] for i in token_ids_of(c["choices"][0]["logprobs"])
    ]
    assert streamed == ids


def test_penalties_min_p_bias_and_min_tokens_act(http):
    plain = complete(http, return_tokens_as_token_ids=True, logprobs=0, max_tokens=16)
    plain_ids = token_ids_of(plain["logprobs"])
    assert len(set(plain_ids)) < len(plain_ids)  # the tiny model repeats itself...
    for field, value in [("frequency_penalty", 2.0), ("presence_penalty", 2.0), ("repetition_penalty", 3.0)]:
        got = token_ids_of(
            complete(http, return_tokens_as_token_ids=True, logprobs=0, max_tokens=16, **{field: value})[
                "logprobs"
            ]
        )
        assert got != plain_ids, field  # ...and less so when penalised
        assert len(set(got)) >= len(set(plain_ids)), field
    forced = complete(http, logit_bias={"300": 100}, return_tokens_as_token_ids=True, logprobs=0)
    assert token_ids_of(forced["logprobs"]) == [300] * 8
    sampled = complete(http, temperature=1.0, min_p=1.0, seed=3, return_tokens_as_token_ids=True, logprobs=0)
    assert token_ids_of(sampled["logprobs"]) == plain_ids[:8]  # min_p = 1 leaves only the argmax
    stop_early = dict(ignore_eos=False, max_tokens=8, logit_bias={"2": 100})
    r = http.post("/v1/completions", json=dict(model=BASE, prompt=PROMPT, temperature=0, **stop_early))
    assert r.json()["usage"]["completion_tokens"] == 1
    r = http.post(
        "/v1/completions", json=dict(model=BASE, prompt=PROMPT, temperature=0, min_tokens=5, **stop_early)
    )
    assert r.json()["usage"]["completion_tokens"] == 6 and r.json()["choices"][0]["finish_reason"] == "stop"


REFUSED_VALUES = {
    "use_beam_search": True, "length_penalty": 0.5, "include_stop_str_in_output": True,
    "skip_special_tokens": False, "spaces_between_special_tokens": False, "truncate_prompt_tokens": 3,
    "allowed_token_ids": [1, 2], "bad_words": ["x"], "prompt_logprobs": 1, "logits_processors": ["x"],
    "guided_decoding_backend": "outlines", "guided_whitespace_pattern": " ", "structural_tag": "{}",
    "tools": [{"type": "function"}], "tool_choice": "required", "functions": [{}], "function_call": "x",
    "prediction": {"type": "content"}, "audio": {"voice": "x"}, "modalities": ["audio"],
    "continue_final_message": True, "chat_template": "x", "chat_template_kwargs": {"a": 1},
    "documents": [{}], "prompt_embeds": "x",
}  # fmt: skip


@pytest.mark.parametrize("field", sorted(UNSUPPORTED_SAMPLING))
def test_unsupported_fields_are_refused_by_name(http, field):
    body = dict(model=BASE, prompt=PROMPT, max_tokens=2, **{field: REFUSED_VALUES[field]})
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
    assert field in r.json()["error"]["message"]
    neutral = UNSUPPORTED_SAMPLING[field][-1]
    assert http.post("/v1/completions", json={**body, field: neutral}).status_code == 200, neutral


def test_refused_combinations(http):
    def param(body: dict, path: str = "/v1/completions") -> str:
        r = http.post(path, json={"model": BASE, "max_tokens": 2, **body})
        assert r.status_code == 400, r.text
        return r.json()["error"]["param"]

    assert param({"prompt": "x", "n": 2, "best_of": 3}) == "best_of"
    assert (
        http.post("/v1/completions", json={"model": BASE, "prompt": "x", "n": 2, "best_of": 2}).status_code
        == 200
    )
    assert param({"prompt": "x", "suffix": "y"}) == "suffix"
    chat = {"messages": [{"role": "user", "content": "x"}]}
    assert param({**chat, "echo": True}, "/v1/chat/completions") == "echo"
    assert param({**chat, "top_logprobs": 2}, "/v1/chat/completions") == "top_logprobs"
    assert param({"prompt": "x", "guided_regex": "a", "guided_choice": ["b"]}) == "response_format"
    assert param({"prompt": "x", "guided_choice": ["a"], "min_tokens": 2}) == "min_tokens"
    assert param({"prompt": "x", "logit_bias": {"99999": 1}}) == "logit_bias"
    assert param({"prompt": "x", "logit_bias": {"abc": 1}}) == "logit_bias"
    assert param({"prompt": "x", "structured_outputs": {"json": {}, "whatever": 1}}).startswith(
        "structured_outputs"
    )


def test_tokenize_and_detokenize_answer_as_vllm(http, server):
    tok = server.engine.served.tokenizer
    r = http.post("/tokenize", json={"model": BASE, "prompt": "Hello world", "return_token_strs": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tokens"] == tok.encode("Hello world")
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] == 256
    assert body["token_strs"] == tok.convert_ids_to_tokens(body["tokens"])
    messages = [{"role": "user", "content": "hi"}]
    chat = http.post("/tokenize", json={"model": "attn-r4", "messages": messages}).json()
    want = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert chat["tokens"] == tok.encode(want, add_special_tokens=False) and chat["token_strs"] is None
    r = http.post("/detokenize", json={"model": BASE, "tokens": body["tokens"]})
    assert r.json() == {"prompt": "Hello world"}
    assert http.post("/tokenize", json={"model": "ghost", "prompt": "x"}).status_code == 404
    assert http.post("/detokenize", json={"tokens": [10**6]}).status_code == 400
    assert http.post("/tokenize", json={"prompt": "x", "messages": messages}).status_code == 400


def _constrained(model: str, i: int) -> dict:
    """Every way of asking for the schema, rotating over the adapters."""
    ways = [
        {"response_format": {"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA}}},
        {"guided_json": SCHEMA},
        {"structured_outputs": {"json": SCHEMA}},
    ]
    return dict(model=model, max_tokens=120, temperature=0.9, seed=i, **ways[i % len(ways)])


def test_structured_outputs_in_mixed_batches_over_every_adapter(server, http):
    """Per adapter (more than the device slots) and the base: a schema-constrained chat request and a
    free one, all at once. Every constrained output parses and validates; every free output equals
    the same request served alone."""
    models = [BASE] + ADAPTERS
    messages = [{"role": "user", "content": "Describe a thing as JSON."}]
    free = [dict(model=m, messages=messages, max_tokens=12, temperature=0, ignore_eos=True) for m in models]
    alone = [
        http.post("/v1/chat/completions", json=b).json()["choices"][0]["message"]["content"] for b in free
    ]

    async def burst():
        async with httpx.AsyncClient(base_url=server.url, timeout=300) as ac:
            bodies = [dict(_constrained(m, i), messages=messages) for i, m in enumerate(models)] + free
            return await asyncio.gather(*[ac.post("/v1/chat/completions", json=b) for b in bodies])

    responses = asyncio.run(burst())
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
    texts = [r.json()["choices"][0]["message"]["content"] for r in responses]
    for model, text in zip(models, texts[: len(models)], strict=True):
        jsonschema.validate(json.loads(text), SCHEMA)  # parses, and matches the schema
        assert model
    assert texts[len(models) :] == alone
    assert server.engine.stats().num_steps > 0


def test_other_constraints_and_json_object(http, client, server):
    def text(**fields) -> str:
        return complete(
            http,
            **(dict(prompt="Answer:", temperature=1.0, seed=1, max_tokens=60, ignore_eos=False) | fields),
        )["text"]

    assert text(guided_choice=["yes", "no", "maybe so"]) in {"yes", "no", "maybe so"}
    assert text(structured_outputs={"choice": ["left", "right"]}) in {"left", "right"}
    import re

    assert re.fullmatch(r"[0-9]{3}-[a-c]{2}", text(guided_regex=r"[0-9]{3}-[a-c]{2}"))
    assert text(guided_grammar='root ::= "A" [0-9] [0-9]?')[0] == "A"
    (close,) = server.engine.served.tokenizer.encode("}")  # nudged to close: any object is allowed
    obj = text(response_format={"type": "json_object"}, max_tokens=120, logit_bias={str(close): 6})
    assert isinstance(json.loads(obj), dict)
    res = client.chat.completions.create(
        model="all-r64", messages=[{"role": "user", "content": "x"}], max_tokens=120, seed=2,
        response_format={"type": "json_schema", "json_schema": {"name": "t", "schema": SCHEMA}},
    )  # fmt: skip
    jsonschema.validate(json.loads(res.choices[0].message.content), SCHEMA)


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"guided_json": {"type": "objectx"}}, "guided_json"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}}},
            "response_format",
        ),
        ({"guided_regex": "a(b"}, "guided_regex"),
        ({"guided_grammar": "root ::= undefined_rule"}, "guided_grammar"),
        ({"structured_outputs": {"json": "{not json"}}, "structured_outputs"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ],
)
def test_invalid_constraints_are_400(http, fields, param):
    r = http.post("/v1/completions", json=dict(model=BASE, prompt="x", max_tokens=4, **fields))
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
