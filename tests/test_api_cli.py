"""The ``loraplex`` command line: flags map onto Settings, ``merge`` exports, ``serve`` runs and drains."""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import httpx
import pytest

from server.cli import build_parser, is_loopback, main, settings_from_args
from server.config import Settings
from server.store import tree_digest
from tests.api_harness import greedy_ids, peft_model
from tests.lora_fixtures import make_peft_adapter
from tests.server_process import ServerProcess


def test_serve_flags_map_onto_settings(tmp_path):
    ns = build_parser().parse_args(
        [
            "serve",
            "--model", str(tmp_path),
            "--port", "9123",
            "--max-loras", "3",
            "--adapter-store", str(tmp_path / "store"),
            "--merged-adapter", "sql",
            "--no-enable-lora",
            "--api-keys", "k1", "k2",
            "--key-adapter-allowlists", '{"k1": ["team-*"]}',
            "--allowed-lora-roots", "/a", "/b",
            "--dtype", "float32",
            "--drain-timeout-s", "2.5",
            "--no-prefix-caching",
            "--adapter-max-wait-s", "0.5",
        ]
    )  # fmt: skip
    s = settings_from_args(ns)
    assert s.model == tmp_path and s.port == 9123 and s.max_loras == 3
    assert s.adapter_store == tmp_path / "store" and s.merged_adapter == "sql"
    assert s.enable_lora is False and s.api_keys == ["k1", "k2"]
    assert s.key_adapter_allowlists == {"k1": ["team-*"]}
    assert s.allowed_lora_roots == [Path("/a"), Path("/b")]
    assert s.dtype == "float32" and s.drain_timeout_s == 2.5
    assert s.prefix_caching is False and Settings().prefix_caching is True and s.adapter_max_wait_s == 0.5


def test_seconds_flags_also_take_the_name_without_the_unit():
    ns = build_parser().parse_args(
        ["serve", "--drain-timeout", "2.5", "--engine-step-timeout", "7", "--metrics-require-key"]
    )
    s = settings_from_args(ns)
    assert s.drain_timeout_s == 2.5 and s.engine_step_timeout_s == 7 and s.metrics_require_key is True
    assert (
        settings_from_args(
            build_parser().parse_args(["serve", "--engine-step-timeout-s", "0"])
        ).engine_step_timeout_s
        == 0
    )


def test_unset_flags_fall_back_to_the_environment(monkeypatch):
    monkeypatch.setenv("LORAPLEX_MAX_LORAS", "5")
    monkeypatch.setenv("LORAPLEX_PORT", "7000")
    s = settings_from_args(build_parser().parse_args(["serve", "--port", "7001"]))
    assert s.max_loras == 5 and s.port == 7001


def test_invalid_settings_exit_2(capsys):
    assert main(["serve", "--device", "tpu"]) == 2
    assert "invalid settings" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", "--dtype", "float64"])


def test_merge_by_store_name(tmp_path, tiny_llama_dir, capsys):
    store = tmp_path / "store"
    adapter = make_peft_adapter(tiny_llama_dir, store / "sql", r=8, seed=12)
    out = tmp_path / "merged"
    code = main(
        [
            "merge",
            "--base",
            str(tiny_llama_dir),
            "--adapter",
            "sql",
            "--adapter-store",
            str(store),
            "--out",
            str(out),
        ]
    )
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert Path(report["path"]) == out.resolve()
    assert report["digest"] == f"sha256:{tree_digest(out)}"
    prompt = [11, 22, 33, 44]
    oracle = greedy_ids(peft_model(tiny_llama_dir, {"sql": adapter}), prompt, 6)
    assert greedy_ids(peft_model(out), prompt, 6) == oracle
    assert (
        main(["merge", "--base", str(tiny_llama_dir), "--adapter", "../sql", "--out", str(tmp_path / "x")])
        == 2
    )


def test_serve_runs_the_app_and_stops_cleanly_on_sigterm(tmp_path, tiny_llama_dir):
    store = tmp_path / "store"
    shutil.copytree(make_peft_adapter(tiny_llama_dir, tmp_path / "made", r=4, seed=3), store / "ad1")
    args = [
        "--model", str(tiny_llama_dir), "--served-model-name", "tiny",
        "--adapter-store", str(store), "--device", "cpu", "--num-kv-blocks", "64", "--log-level", "info",
    ]  # fmt: skip
    with ServerProcess(args, tmp_path / "server.log") as srv:
        r = httpx.post(
            f"{srv.url}/v1/completions", json={"model": "ad1", "prompt": "hello", "max_tokens": 3}, timeout=30
        )
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        srv.signal(signal.SIGTERM)
        # uvicorn shuts down gracefully, then re-raises the captured signal as its exit status.
        assert srv.wait(timeout=30) in (0, -signal.SIGTERM)
        log = srv.log()
        assert "Application shutdown complete" in log, log
        assert "auth is off" not in log  # loopback without keys is the local-development setup


def test_loopback_hosts():
    """Serving without keys on anything but these logs a warning that adapters are open to mutation."""
    assert all(map(is_loopback, ["127.0.0.1", "::1", "localhost", "127.0.0.2"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "10.0.0.5", "example.org"]))


def test_list_settings_take_comma_separated_or_json_values(monkeypatch):
    """What operators type in a Kubernetes Secret or ``docker run -e`` works, and JSON still does."""
    monkeypatch.setenv("LORAPLEX_API_KEYS", "k1, k2,k3")
    monkeypatch.setenv("LORAPLEX_ADMIN_KEYS", '["a,1", "b"]')  # JSON: a comma inside an item stays
    monkeypatch.setenv("LORAPLEX_ALLOWED_LORA_ROOTS", "/srv/a,/srv/b")
    s = settings_from_args(build_parser().parse_args(["serve"]))
    assert s.api_keys == ["k1", "k2", "k3"] and s.admin_keys == ["a,1", "b"]
    assert s.allowed_lora_roots == [Path("/srv/a"), Path("/srv/b")]
    monkeypatch.setenv("LORAPLEX_API_KEYS", "single")
    assert settings_from_args(build_parser().parse_args(["serve"])).api_keys == ["single"]
    monkeypatch.setenv("LORAPLEX_API_KEYS", "")
    assert settings_from_args(build_parser().parse_args(["serve"])).api_keys == []
    ns = build_parser().parse_args(["serve", "--api-keys", "x,y", "z", "--admin-keys", '["p", "q"]'])
    s = settings_from_args(ns)
    assert s.api_keys == ["x", "y", "z"] and s.admin_keys == ["p", "q"]
    monkeypatch.setenv("LORAPLEX_API_KEYS", "[not json")
    assert main(["serve"]) == 2


@pytest.mark.parametrize("command", ["serve", "merge"])
def test_every_subcommand_prints_its_help(command, capsys):
    """argparse %-formats help texts: a setting's description with a bare '%' made `serve --help` crash."""
    from server.cli import build_parser

    with pytest.raises(SystemExit) as done:
        build_parser().parse_args([command, "--help"])
    assert done.value.code == 0
    assert "--max-loras" in capsys.readouterr().out or command == "merge"
