"""Auth rules: Bearer keys, admin-only mutations, per-key adapter allow-lists, keys never logged."""

from __future__ import annotations

import contextlib
import hmac
import logging
import shutil

import httpx
import pytest

from server.api.auth import Authenticator
from server.api.errors import APIError
from server.config import Settings
from tests.api_harness import LiveServer
from tests.lora_fixtures import make_peft_adapter

BASE = "tiny"
KEYS = {
    "a": "sk-tenant-a-SECRET",
    "b": "sk-tenant-b-SECRET",
    "all": "sk-all-SECRET",
    "admin": "sk-admin-SECRET",
}


def auth_settings(**extra) -> Settings:
    return Settings(
        api_keys=[KEYS["a"], KEYS["b"], KEYS["all"]],
        admin_keys=[KEYS["admin"]],
        key_adapter_allowlists={KEYS["a"]: ["tenant-a-*"], KEYS["b"]: ["tenant-b-*", "shared"]},
        **extra,
    )


def test_authenticator_rules(monkeypatch):
    auth = Authenticator(auth_settings())
    assert auth.authenticate(f"Bearer {KEYS['admin']}").is_admin
    a = auth.authenticate(f"bearer {KEYS['a']}")
    assert not a.is_admin and a.can_use("tenant-a-1") and not a.can_use("tenant-b-1")
    assert auth.authenticate(f"Bearer {KEYS['all']}").can_use("anything")
    for header in (None, "", "Bearer", "Basic abc", f"Token {KEYS['a']}", "Bearer sk-wrong"):
        with pytest.raises(APIError) as info:
            auth.authenticate(header)
        assert info.value.status == 401 and info.value.headers == {"WWW-Authenticate": "Bearer"}
        assert KEYS["a"] not in info.value.message

    calls = []
    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda x, y: calls.append(1) or real(x, y))
    for key in (
        KEYS["a"],
        KEYS["admin"],
        "sk-wrong",
    ):  # same work whether the key matches first, last or never
        calls.clear()
        with contextlib.suppress(APIError):
            auth.authenticate(f"Bearer {key}")
        assert len(calls) == 4


def test_no_keys_means_open_admin_access():
    principal = Authenticator(Settings()).authenticate(None)
    assert principal.is_admin and principal.can_use("x")


def test_metrics_behind_the_keys_only_when_the_operator_asks():
    """``--metrics-require-key``: off by default (the inference gateway scrapes /metrics)."""
    from fastapi.testclient import TestClient

    from server.api.app import create_app

    # No lifespan (no `with`): nothing boots, which /health, /ready and /metrics do not need.
    assert TestClient(create_app(auth_settings())).get("/metrics").status_code == 200
    locked = TestClient(create_app(auth_settings(metrics_require_key=True)))
    r = locked.get("/metrics")
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert locked.get("/metrics", headers={"Authorization": "Bearer sk-guess"}).status_code == 401
    r = locked.get("/metrics", headers={"Authorization": f"Bearer {KEYS['a']}"})
    assert r.status_code == 200 and "loraplex_http_requests_total" in r.text
    assert locked.get("/health").status_code == 200  # probes stay open


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_llama_dir):
    root = tmp_path_factory.mktemp("api_auth")
    adapter = make_peft_adapter(tiny_llama_dir, root / "made", r=4, seed=5)
    store = root / "store"
    for name in ("tenant-a-one", "tenant-b-one", "shared", "doomed"):
        shutil.copytree(adapter, store / name)
    settings = auth_settings(
        model=tiny_llama_dir,
        served_model_name=BASE,
        adapter_store=store,
        export_dir=root / "exports",
        device="cpu",
        num_kv_blocks=64,
    )
    with LiveServer(settings) as srv:
        yield srv


def client(server, who: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {KEYS[who]}"} if who else {}
    return httpx.Client(base_url=server.url, headers=headers, timeout=30)


def completion(c: httpx.Client, model: str, **extra) -> httpx.Response:
    return c.post("/v1/completions", json={"model": model, "prompt": [4, 5, 6], "max_tokens": 2, **extra})


def test_keys_required_except_for_probes(server):
    with client(server, None) as c:
        for path in ("/health", "/ready", "/metrics"):
            assert c.get(path).status_code == 200
        r = completion(c, BASE)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert r.json()["error"]["type"] == "authentication_error"
        assert c.get("/v1/models").status_code == 401
        r = c.get("/v1/models", headers={"Authorization": "Bearer sk-guess-SECRET"})
        assert r.status_code == 401


def test_allow_lists_filter_use_and_listing(server):
    with client(server, "a") as c:
        assert {m["id"] for m in c.get("/v1/models").json()["data"]} == {BASE, "tenant-a-one"}
        assert {a["id"] for a in c.get("/v1/adapters").json()["data"]} == {"tenant-a-one"}
        assert completion(c, "tenant-a-one").status_code == 200
        assert completion(c, BASE).status_code == 200
        hidden = completion(c, "tenant-b-one")
        missing = completion(c, "no-such-adapter")
        assert hidden.status_code == missing.status_code == 404
        assert hidden.json()["error"]["message"].replace("tenant-b-one", "X") == missing.json()["error"][
            "message"
        ].replace("no-such-adapter", "X")
        assert completion(c, BASE, adapters={"tenant-a-one": 0.5, "tenant-b-one": 0.5}).status_code == 404
        assert c.get("/v1/adapters/tenant-b-one").status_code == 404
    with client(server, "b") as c:
        assert {a["id"] for a in c.get("/v1/adapters").json()["data"]} == {"tenant-b-one", "shared"}
    with client(server, "all") as c:
        assert {a["id"] for a in c.get("/v1/adapters").json()["data"]} == {
            "tenant-a-one",
            "tenant-b-one",
            "shared",
            "doomed",
        }


def test_mutations_need_an_admin_key(server):
    mutations = [
        ("POST", "/v1/adapters", dict(data={"name": "x"}, files={"adapter_config.json": ("a", b"{}")})),
        ("DELETE", "/v1/adapters/doomed", {}),
        ("POST", "/v1/adapters/shared/merge", {}),
        ("POST", "/v1/load_lora_adapter", dict(json={"lora_name": "x", "lora_path": "/tmp"})),
        ("POST", "/v1/unload_lora_adapter", dict(json={"lora_name": "shared"})),
    ]
    for who in ("a", "all"):
        with client(server, who) as c:
            for method, path, kwargs in mutations:
                r = c.request(method, path, **kwargs)
                assert r.status_code == 403, (who, path, r.text)
                assert r.json()["error"]["type"] == "permission_error"
    with client(server, "admin") as c:
        assert c.delete("/v1/adapters/doomed").status_code == 200
        r = c.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/tmp"})
        assert r.status_code == 400 and "allowed_lora_roots" in r.json()["error"]["message"]
        assert completion(c, "tenant-b-one").status_code == 200  # no allow-list: every adapter


def test_keys_never_logged(server, caplog):
    caplog.set_level(logging.DEBUG)
    for who in KEYS:
        with client(server, who) as c:
            completion(c, "tenant-a-one")
            c.delete("/v1/adapters/nothing")
    with httpx.Client(base_url=server.url, headers={"Authorization": "Bearer sk-guess-SECRET"}) as c:
        c.get("/v1/models")
    text = caplog.text + "".join(str(r.args) for r in caplog.records)
    assert "SECRET" not in text
