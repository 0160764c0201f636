"""The Python clients (sync and async), the CLI and the openai package against the real server.

One server per module: the tiny Llama with a chat template added, auth on (a user key, an admin key, a
key limited to ``ad-*``), a vLLM load root and a small body limit, so every call and every error status
the API documents can be provoked for real.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from clients import (
    APIConnectionError,
    AsyncLoraplexClient,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    LoraplexClient,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    RateLimitError,
)
from clients.cli import main as cli_main
from server.config import Settings
from tests.api_harness import LiveServer, greedy_ids
from tests.lora_fixtures import ATTENTION, make_peft_adapter

USER, ADMIN, LIMITED = "user-key", "admin-key", "limited-key"
CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"


@pytest.fixture(scope="module")
def model_dir(tiny_llama_dir, tmp_path_factory) -> Path:
    """The tiny Llama plus a chat template, so /v1/chat/completions works."""
    out = tmp_path_factory.mktemp("chat_llama") / "tiny-chat"
    shutil.copytree(tiny_llama_dir, out)
    tok = AutoTokenizer.from_pretrained(out)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapters(model_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("client_loras")
    return {
        "ad-one": make_peft_adapter(model_dir, root / "ad-one", r=4, target_modules=ATTENTION, seed=11),
        "ad-two": make_peft_adapter(
            model_dir, root / "ad-two", r=8, target_modules=["q_proj", "v_proj"], seed=12
        ),
    }


@pytest.fixture(scope="module")
def server(model_dir, adapters, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("client_server")
    settings = Settings(
        model=model_dir,
        device="cpu",
        adapter_store=tmp / "store",
        export_dir=tmp / "exports",
        num_kv_blocks=128,
        max_num_seqs=8,
        max_loras=2,
        api_keys=[USER, LIMITED],
        admin_keys=[ADMIN],
        key_adapter_allowlists={LIMITED: ["ad-*"]},
        allowed_lora_roots=[next(iter(adapters.values())).parent],
        max_body_bytes=64 * 1024,
    )
    with LiveServer(settings) as srv:
        admin = LoraplexClient(srv.url, api_key=ADMIN)
        for name, path in adapters.items():
            admin.upload_adapter(path, name)
        admin.close()
        yield srv


@pytest.fixture
def client(server):
    with LoraplexClient(server.url, api_key=USER, admin_key=ADMIN) as c:
        yield c


def test_models_and_base_model(client, server):
    models = client.models()
    base = [m for m in models if m.parent is None]
    assert [m.id for m in base] == ["tiny-chat"] == [client.base_model()]
    assert {m.id for m in models if m.parent == "tiny-chat"} >= {"ad-one", "ad-two"}
    assert client.health() and client.ready()
    assert "loraplex" in client.metrics() or "# HELP" in client.metrics()


def test_adapter_lifecycle_and_errors(client, server, adapters, tmp_path):
    info = client.upload_adapter(adapters["ad-one"], "copy-one")
    assert (info.name, info.rank, info.source, info.base_model) == ("copy-one", 4, "store", "tiny-chat")
    assert info.digest.startswith("sha256:") and info.size_bytes > 0
    assert sorted(info.target_modules) == sorted(ATTENTION)
    assert "copy-one" in {a.name for a in client.list_adapters()}
    assert client.get_adapter("copy-one").rank == 4

    with pytest.raises(ConflictError) as exc:
        client.upload_adapter(adapters["ad-two"], "copy-one")
    assert exc.value.status == 409 and "already exists" in exc.value.message
    with pytest.raises(BadRequestError) as exc:
        client.upload_adapter(adapters["ad-one"], "-bad name")
    assert exc.value.param == "name"
    broken = tmp_path / "broken"
    shutil.copytree(adapters["ad-one"], broken)
    (broken / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": "x"}))
    with pytest.raises(BadRequestError):
        client.upload_adapter(broken, "broken")
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        (broken / "adapter_model.safetensors").unlink()
        client.upload_adapter(broken, "broken")

    with LoraplexClient(server.url, api_key=USER) as user:  # a user key may read but not mutate
        with pytest.raises(PermissionDeniedError) as exc:
            user.delete_adapter("copy-one")
        assert exc.value.status == 403 and exc.value.type == "permission_error"

    client.delete_adapter("copy-one")
    with pytest.raises(NotFoundError):
        client.get_adapter("copy-one")
    with pytest.raises(NotFoundError):
        client.delete_adapter("copy-one")
    with pytest.raises(NotFoundError) as exc:
        client.complete("hello", "copy-one")
    assert exc.value.status == 404 and "copy-one" in exc.value.message


def test_authentication_and_allow_lists(client, server, adapters):
    for key in (None, "wrong-key"):
        with LoraplexClient(server.url, api_key=key) as anon, pytest.raises(AuthenticationError) as exc:
            anon.models()
        assert exc.value.status == 401 and "API key" in exc.value.message
    client.upload_adapter(adapters["ad-one"], "zz-hidden")
    try:
        with LoraplexClient(server.url, api_key=LIMITED) as limited:
            names = {a.name for a in limited.list_adapters()}
            assert {"ad-one", "ad-two"} <= names and all(n.startswith("ad-") for n in names)
            with pytest.raises(NotFoundError):  # outside the key's allow-list looks exactly like missing
                limited.get_adapter("zz-hidden")
            with pytest.raises(NotFoundError):
                limited.complete("x", "zz-hidden", max_tokens=2)
            assert limited.complete("x", "ad-one", max_tokens=2).usage.completion_tokens >= 1
            with pytest.raises(PermissionDeniedError):
                limited.merge_adapter("ad-one")
    finally:
        client.delete_adapter("zz-hidden")


def test_completion_stream_and_usage_agree(client, model_dir):
    for model in (None, "ad-one"):
        whole = client.complete("the model server", model, max_tokens=12, temperature=0, ignore_eos=True)
        chunks = list(
            client.stream_complete(
                "the model server", model, max_tokens=12, temperature=0, extra={"ignore_eos": True}
            )
        )
        assert "".join(c.text for c in chunks) == whole.text
        assert whole.usage.completion_tokens == 12 and chunks[-1].usage == whole.usage
        assert whole.choices[0].finish_reason == "length"
        assert [c.finish_reason for c in chunks if c.finish_reason] == ["length"]
    base = client.complete("the model server", max_tokens=12, temperature=0, ignore_eos=True).text
    assert (
        client.complete("the model server", "ad-one", max_tokens=12, temperature=0, ignore_eos=True).text
        != base
    )
    ids = AutoTokenizer.from_pretrained(model_dir).encode("the model server")  # what the server does
    assert client.complete(ids, max_tokens=12, temperature=0, ignore_eos=True).text == base  # token-id prompt


def test_chat_matches_completion_of_the_rendered_prompt(client, model_dir):
    messages = [{"role": "user", "content": "tell me about adapters"}]
    chat = client.chat(messages, "ad-two", max_tokens=10, temperature=0, ignore_eos=True)
    streamed = list(client.stream_chat(messages, "ad-two", max_tokens=10, temperature=0, ignore_eos=True))
    assert "".join(c.text for c in streamed) == chat.text and chat.choices[0].message.role == "assistant"
    tok = AutoTokenizer.from_pretrained(model_dir)
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok.encode(rendered, add_special_tokens=False)
    assert client.complete(ids, "ad-two", max_tokens=10, temperature=0, ignore_eos=True).text == chat.text
    assert chat.usage.prompt_tokens == len(ids)


def test_weighted_composition(client):
    mix = client.complete("hello", adapters={"ad-one": 0.5, "ad-two": 0.5}, max_tokens=6, temperature=0)
    assert mix.usage.completion_tokens >= 1
    with pytest.raises(BadRequestError) as exc:
        client.complete("hello", "ad-one", adapters={"ad-two": 1.0}, max_tokens=4)
    assert exc.value.param == "model"


def test_request_errors_map_to_exceptions(client):
    with pytest.raises(BadRequestError) as exc:
        client.complete("hello", max_tokens=10_000)
    assert "maximum context length" in exc.value.message and exc.value.type == "invalid_request_error"
    with pytest.raises(BadRequestError) as exc:
        client.complete("hello", temperature=5.0)
    assert exc.value.param == "temperature" and exc.value.code == 400
    with pytest.raises(PayloadTooLargeError) as exc:
        client.complete("word " * 20_000, max_tokens=1)
    assert exc.value.status == 413
    with pytest.raises(NotFoundError):
        list(client.stream_complete("hello", "no-such-adapter"))


def test_vllm_load_unload_and_merge(client, adapters, tmp_path, model_dir):
    client.load_lora_adapter("vllm-one", adapters["ad-one"])
    assert client.get_adapter("vllm-one").source == "path"
    a = client.complete("merge me", "vllm-one", max_tokens=8, temperature=0, ignore_eos=True).text
    assert a == client.complete("merge me", "ad-one", max_tokens=8, temperature=0, ignore_eos=True).text
    with pytest.raises(BadRequestError, match="allowed roots"):
        client.load_lora_adapter("outside", tmp_path)
    client.unload_lora_adapter("vllm-one")
    with pytest.raises(NotFoundError):
        client.unload_lora_adapter("vllm-one")

    merged = client.merge_adapter("ad-one")
    assert merged.name == "ad-one" and merged.digest.startswith("sha256:")
    # The export is a plain HF checkpoint whose greedy output is the adapter's.
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(merged.path, dtype=torch.float32).eval()
    ids = tok.encode("merge me")
    assert tok.decode(greedy_ids(model, ids, 8)) == a  # plain argmax loop, like ignore_eos above


def test_async_client(server, adapters):
    async def go():
        async with AsyncLoraplexClient(server.url, api_key=USER, admin_key=ADMIN) as c:
            assert await c.base_model() == "tiny-chat" and await c.ready() and await c.health()
            info = await c.upload_adapter(adapters["ad-two"], "async-two")
            assert info.rank == 8 and "async-two" in {a.name for a in await c.list_adapters()}
            assert (await c.get_adapter("async-two")).name == "async-two"
            whole = await c.complete("async", "async-two", max_tokens=6, temperature=0, ignore_eos=True)
            parts = [ch.text async for ch in c.stream_complete("async", "async-two", max_tokens=6, temperature=0,
                                                                extra={"ignore_eos": True})]  # fmt: skip
            assert "".join(parts) == whole.text
            msgs = [{"role": "user", "content": "hi"}]
            chat = await c.chat(msgs, max_tokens=4, temperature=0)
            assert (
                "".join([ch.text async for ch in c.stream_chat(msgs, max_tokens=4, temperature=0)])
                == chat.text
            )
            results = await asyncio.gather(*(c.complete("x", "async-two", max_tokens=3) for _ in range(4)))
            assert all(r.usage.completion_tokens >= 1 for r in results)
            await c.delete_adapter("async-two")
            with pytest.raises(NotFoundError):
                await c.get_adapter("async-two")
            with pytest.raises(NotFoundError):
                async for _ in c.stream_complete("x", "async-two"):
                    pass
            with pytest.raises(PermissionDeniedError):
                await AsyncLoraplexClient(server.url, api_key=USER).delete_adapter("ad-one")
            assert "# HELP" in await c.metrics()

    asyncio.run(go())


def test_connection_errors():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    with LoraplexClient(url, model="m") as c:
        with pytest.raises(APIConnectionError):
            c.complete("x")
        with pytest.raises(APIConnectionError):
            list(c.stream_complete("x"))
        assert not c.health()


def test_openai_package_works_against_the_server(server):
    openai = pytest.importorskip("openai")
    oa = openai.OpenAI(base_url=f"{server.url}/v1", api_key=USER)
    with LoraplexClient(server.url, api_key=USER) as ours:
        want = ours.complete("openai compat", "ad-one", max_tokens=8, temperature=0, ignore_eos=True).text
    got = oa.completions.create(model="ad-one", prompt="openai compat", max_tokens=8, temperature=0,
                                extra_body={"ignore_eos": True})  # fmt: skip
    assert got.choices[0].text == want
    stream = oa.completions.create(model="ad-one", prompt="openai compat", max_tokens=8, temperature=0, stream=True,
                                   extra_body={"ignore_eos": True})  # fmt: skip
    assert "".join(c.choices[0].text for c in stream if c.choices) == want
    chat = oa.chat.completions.create(
        model="ad-two", messages=[{"role": "user", "content": "hi"}], max_tokens=4
    )
    assert chat.choices[0].message.role == "assistant"
    assert {m.id for m in oa.models.list()} >= {"tiny-chat", "ad-one", "ad-two"}
    with pytest.raises(openai.NotFoundError):
        oa.completions.create(model="missing", prompt="x", max_tokens=2)


def test_rate_limit_maps_to_429_with_retry_after(tiny_llama_dir, tmp_path):
    settings = Settings(
        model=tiny_llama_dir, device="cpu", adapter_store=tmp_path / "s", num_kv_blocks=64,
        max_num_seqs=1, max_num_batched_tokens=64, max_queue_len=1,
    )  # fmt: skip

    async def flood(url):
        async with AsyncLoraplexClient(url) as c:
            base = await c.base_model()
            calls = [c.complete("flood the queue", base, max_tokens=48, ignore_eos=True) for _ in range(12)]
            return await asyncio.gather(*calls, return_exceptions=True)

    with LiveServer(settings) as srv:
        results = asyncio.run(flood(srv.url))
    limited = [r for r in results if isinstance(r, RateLimitError)]
    assert limited, results
    assert all(e.status == 429 and e.retry_after == 1.0 and "queue" in e.message for e in limited)
    assert all(not isinstance(r, Exception) or isinstance(r, RateLimitError) for r in results)


def test_cli(server, adapters, capsys, tmp_path):
    conn = ["--url", server.url, "--api-key", USER, "--admin-key", ADMIN]
    assert cli_main(["adapters", "upload", str(adapters["ad-two"]), "--name", "cli-two", *conn]) == 0
    assert "uploaded cli-two (rank 8)" in capsys.readouterr().out
    assert cli_main(["adapters", "ls", *conn]) == 0
    assert "cli-two\trank=8 source=store" in capsys.readouterr().out
    assert cli_main(["adapters", "ls", "--json", *conn]) == 0
    assert "cli-two" in {a["id"] for a in json.loads(capsys.readouterr().out)}
    assert cli_main(["adapters", "get", "cli-two", *conn]) == 0
    assert json.loads(capsys.readouterr().out)["rank"] == 8

    with LoraplexClient(server.url, api_key=USER) as c:
        want = c.complete("cli prompt", "cli-two", max_tokens=10, temperature=0).text
    assert cli_main(["complete", "--adapter", "cli-two", "--max-tokens", "10", "cli prompt", *conn]) == 0
    assert capsys.readouterr().out == want + "\n"
    assert (
        cli_main(
            ["complete", "--adapter", "cli-two", "--max-tokens", "10", "--no-stream", "cli prompt", *conn]
        )
        == 0
    )
    assert capsys.readouterr().out == want + "\n"
    assert cli_main(["complete", "--chat", "--max-tokens", "3", "hi", *conn]) == 0

    assert cli_main(["adapters", "rm", "cli-two", *conn]) == 0
    assert "deleted cli-two" in capsys.readouterr().out
    assert cli_main(["adapters", "rm", "cli-two", *conn]) == 1
    assert "404" in capsys.readouterr().err
    assert cli_main(["complete", "x", "--url", server.url]) == 1
    assert "401" in capsys.readouterr().err
    assert cli_main(["loadtest", "--url", "http://10.9.9.9:8000"]) == 1
    assert "--allow-remote" in capsys.readouterr().err

    out_json, plots = tmp_path / "lt.json", tmp_path / "plots"
    argv = ["loadtest", *conn, "--adapters", "2", "--popularity", "zipf", "--rate", "20", "--num-requests", "12",
            "--duration", "5", "--input-len", "uniform:4:12", "--output-len", "fixed:4", "--no-progress",
            "--json", str(out_json), "--plot-dir", str(plots)]  # fmt: skip
    assert cli_main(argv) == 0
    out = capsys.readouterr().out
    assert "12 requests" in out and "TTFT" in out and "per adapter" in out
    report = json.loads(out_json.read_text())["report"]
    assert report["ok"] == 12 and report["errors"] == {}
    assert (plots / "latency_cdf.png").stat().st_size > 10_000


def test_loraplex_entry_point_has_the_client_commands(server, adapters, capsys):
    """`loraplex adapters ...` / `loraplex complete ...` reach the same client code as `python -m clients`."""
    from server.cli import main as loraplex_main

    conn = ["--url", server.url, "--api-key", ADMIN]
    assert loraplex_main(["adapters", "upload", str(adapters["ad-two"]), "--name", "entry-two", *conn]) == 0
    assert "uploaded entry-two" in capsys.readouterr().out
    assert loraplex_main(["adapters", "ls", "--json", *conn]) == 0
    assert "entry-two" in {a["id"] for a in json.loads(capsys.readouterr().out)}
    assert (
        loraplex_main(["complete", "--adapter", "entry-two", "--max-tokens", "4", "--no-stream", "hi", *conn])
        == 0
    )
    assert capsys.readouterr().out.strip()
    assert loraplex_main(["adapters", "rm", "entry-two", *conn]) == 0
    assert loraplex_main(["adapters", "rm", "entry-two", *conn]) == 1
    assert "404" in capsys.readouterr().err
