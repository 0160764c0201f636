"""The adapter store and the allowed lora roots cannot be escaped through symbolic links (issue 14, point 1).

An adapter directory, or a file in it, that links outside the store is not listed, served, described,
merged or deleted through, and is logged once; a link swapped in after the listing is caught when the
file is opened; ``load_lora_adapter`` confines a path's files to the allowed root it was found in.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading

import httpx
import pytest

from server.config import Settings
from server.confined import PathEscapeError, open_confined
from server.lora.adapter import load_peft_adapter
from server.lora.errors import AdapterError
from server.store import AdapterStore
from tests.api_harness import LiveServer, greedy_ids, peft_model, token_ids_of
from tests.lora_fixtures import make_peft_adapter

WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"
PROMPT = [4, 8, 15, 16]


@pytest.fixture(scope="module")
def env(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("confine")
    made = {
        n: make_peft_adapter(tiny_llama_dir, root / "made" / n, r=4, seed=s)
        for n, s in [("x", 31), ("y", 32)]
    }
    store = root / "store"
    outside = shutil.copytree(made["y"], root / "outside")  # another tenant's files
    shutil.copytree(made["x"], store / "real")
    shutil.copytree(made["x"], store / "inner-link")  # weights linked out of the store
    os.remove(store / "inner-link" / WEIGHTS)
    os.symlink(outside / WEIGHTS, store / "inner-link" / WEIGHTS)
    shutil.copytree(made["x"], store / "config-link")  # config linked out of the store
    os.remove(store / "config-link" / CONFIG)
    os.symlink(outside / CONFIG, store / "config-link" / CONFIG)
    os.symlink(outside, store / "dir-link")  # the whole adapter directory linked out
    shutil.copytree(made["x"], store / "nested-link")  # a linked sub-directory leading out
    os.symlink(root / "outside", store / "nested-link" / "extra")
    shutil.copytree(made["x"], store / "shared")  # a link that stays inside the store is fine
    os.remove(store / "shared" / WEIGHTS)
    os.symlink(store / "real" / WEIGHTS, store / "shared" / WEIGHTS)
    oracle = greedy_ids(peft_model(tiny_llama_dir, {"x": made["x"]}), PROMPT, 6)
    return dict(root=root, store=store, outside=outside, made=made, model=tiny_llama_dir, oracle=oracle)


ESCAPING = ["config-link", "dir-link", "inner-link", "nested-link"]


def test_links_out_of_the_store_are_not_adapters_and_are_logged_once(env, caplog):
    store = AdapterStore(env["store"])
    with caplog.at_level(logging.WARNING, logger="server.store"):
        for _ in range(3):
            assert store.names() == ["real", "shared"]
        assert not any(store.exists(n) for n in ESCAPING)
    warnings = [r.getMessage() for r in caplog.records]
    for name in ESCAPING:
        assert sum(f"'{name}' is not served" in w for w in warnings) == 1, warnings
    assert len(warnings) == len(ESCAPING)


def test_a_link_swapped_in_after_the_listing_is_caught_at_open(env, tiny_llama_spec, tmp_path):
    store = AdapterStore(tmp_path / "store")
    victim = shutil.copytree(env["made"]["x"], store.root / "victim")
    assert store.exists("victim")  # the listing check passed ...
    os.remove(victim / WEIGHTS)  # ... then the file becomes a link out of the store
    os.symlink(env["outside"] / WEIGHTS, victim / WEIGHTS)
    with pytest.raises(AdapterError, match=r"adapter_model.safetensors refused: .* outside"):
        load_peft_adapter(victim, "victim", tiny_llama_spec, 64, store.root)
    os.remove(victim / WEIGHTS)  # a FIFO swapped in as the weights cannot block the open
    os.mkfifo(victim / WEIGHTS)
    result: dict = {}
    opener = threading.Thread(target=lambda: result.update(e=_open_error(victim / WEIGHTS, store.root)))
    opener.start()
    opener.join(timeout=10)
    assert not opener.is_alive() and "not a regular file" in result["e"]


def _open_error(path, root) -> str:
    try:
        with open_confined(path, root):
            return "opened"
    except PathEscapeError as exc:
        return str(exc)


def test_escaping_adapters_cannot_be_listed_served_merged_or_deleted(env):
    allowed = env["root"] / "allowed"
    shutil.copytree(env["made"]["x"], allowed / "linked-weights")
    os.remove(allowed / "linked-weights" / WEIGHTS)
    os.symlink(env["outside"] / WEIGHTS, allowed / "linked-weights" / WEIGHTS)
    swap = shutil.copytree(env["made"]["x"], allowed / "swap")
    settings = Settings(model=env["model"], served_model_name="tiny", adapter_store=env["store"], device="cpu",
                        num_kv_blocks=64, export_dir=env["root"] / "exports", allowed_lora_roots=[allowed])  # fmt: skip
    outside_before = {p.name: p.read_bytes() for p in env["outside"].iterdir()}
    with LiveServer(settings) as srv:
        url = srv.url
        listed = {m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]}
        assert listed == {"tiny", "real", "shared"}
        assert {a["id"] for a in httpx.get(f"{url}/v1/adapters").json()["data"]} == {"real", "shared"}
        for name in ESCAPING:
            body = {"model": name, "prompt": PROMPT, "max_tokens": 2}
            assert httpx.post(f"{url}/v1/completions", json=body).status_code == 404, name
            assert httpx.get(f"{url}/v1/adapters/{name}").status_code == 404, name
            assert httpx.post(f"{url}/v1/adapters/{name}/merge", timeout=60).status_code == 404, name
            assert httpx.delete(f"{url}/v1/adapters/{name}").status_code == 404, name
        for name in ("real", "shared"):  # a link inside the store is served like a file
            body = dict(model=name, prompt=PROMPT, max_tokens=6, temperature=0, ignore_eos=True, logprobs=0,
                        return_tokens_as_token_ids=True)  # fmt: skip
            r = httpx.post(f"{url}/v1/completions", json=body, timeout=30)
            assert token_ids_of(r.json()["choices"][0]["logprobs"]) == env["oracle"], name

        # load_lora_adapter: the directory is inside the allowed root, its weights link out of it.
        load = {"lora_name": "rt", "lora_path": str(allowed / "linked-weights")}
        r = httpx.post(f"{url}/v1/load_lora_adapter", json=load, timeout=30)
        assert r.status_code == 400 and "refused" in r.json()["error"]["message"], r.text
        # A path loaded fine, then its weights swapped for a link out: a reload is refused, and the
        # name keeps serving what it served before.
        load = {"lora_name": "rt", "lora_path": str(swap)}
        assert httpx.post(f"{url}/v1/load_lora_adapter", json=load, timeout=30).status_code == 200
        os.remove(swap / WEIGHTS)
        os.symlink(env["outside"] / WEIGHTS, swap / WEIGHTS)
        r = httpx.post(f"{url}/v1/load_lora_adapter", json={**load, "load_inplace": True}, timeout=30)
        assert r.status_code == 400 and "outside" in r.json()["error"]["message"], r.text
        body = dict(model="rt", prompt=PROMPT, max_tokens=6, temperature=0, ignore_eos=True, logprobs=0,
                    return_tokens_as_token_ids=True)  # fmt: skip
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=30)
        assert token_ids_of(r.json()["choices"][0]["logprobs"]) == env["oracle"]
    assert {p.name: p.read_bytes() for p in env["outside"].iterdir()} == outside_before
    assert sorted(p.name for p in env["store"].iterdir()) == sorted(["real", "shared", *ESCAPING])
