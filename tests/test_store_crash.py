"""A crash never leaves a half-written adapter or export (issue 14, point 5).

A real server is killed with SIGKILL in the middle of an upload, a delete and a merge export; after
each restart every adapter is complete (byte-identical to what was uploaded) or absent, the restarted
server serves what it lists, and it has removed its own leftovers. ``recover_dir`` itself is checked
on every kind of entry, including another live process's, which it must leave alone.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest

from server.store import LEFTOVER_MAX_AGE_S, recover_dir, temp_name, tree_digest
from tests.lora_fixtures import make_peft_adapter
from tests.server_process import ServerProcess

HOST = socket.gethostname()


def _entry(root: Path, name: str) -> Path:
    (root / name).mkdir()
    (root / name / "f").write_text(name)
    return root / name


def test_recover_dir_removes_only_what_a_dead_process_left(tmp_path):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        u = uuid.uuid4().hex
        trash = _entry(tmp_path, f".trash-{u}.{live.pid}@{HOST}")  # trash is dead weight, whoever made it
        dead_staging = _entry(tmp_path, f".staging-{u}.{dead.pid}@{HOST}")
        own_pid = _entry(tmp_path, f".merge-{u}.{os.getpid()}@{HOST}")  # our pid: a previous life
        dead_tmp = _entry(tmp_path, f"..merge-{u}.{dead.pid}@{HOST}.tmp-0123abcd")
        live_staging = _entry(tmp_path, f".staging-{u}.{live.pid}@{HOST}")  # a replica writing now
        fresh_foreign = _entry(tmp_path, f".staging-{u}.7@other-pod-1")
        stale_foreign = _entry(tmp_path, f".staging-{u}.8@other-pod-2")
        old = time.time() - LEFTOVER_MAX_AGE_S - 60
        for p in (stale_foreign, stale_foreign / "f"):
            os.utime(p, (old, old))
        swapped_out = _entry(tmp_path, f".gone.old-{u}.{dead.pid}@{HOST}")  # crash inside replace_dir
        superseded = _entry(tmp_path, f".kept.old-{u}.{dead.pid}@{HOST}")
        _entry(tmp_path, "kept")
        keep = [_entry(tmp_path, "adapter"), _entry(tmp_path, ".gitkeep-dir")]

        done = recover_dir(tmp_path)

        removed = [trash, dead_staging, own_pid, dead_tmp, stale_foreign, superseded]
        assert sorted(done) == sorted(
            [f"removed {p.name}" for p in removed] + [f"restored gone from {swapped_out.name}"]
        )
        assert not any(p.exists() for p in [*removed, swapped_out])
        assert (tmp_path / "gone" / "f").read_text() == swapped_out.name
        assert all(p.exists() for p in [live_staging, fresh_foreign, *keep, tmp_path / "kept"])
        assert recover_dir(tmp_path) == []
    finally:
        live.kill()
        live.wait()


def test_temp_names_are_hidden_and_recognised():
    name = temp_name("staging")
    assert name.startswith(".staging-") and name.endswith(f".{os.getpid()}@{HOST}")


# --- a real server, killed -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def made(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("crash_made")
    return {
        name: make_peft_adapter(tiny_llama_dir, root / name, r=r, seed=seed)
        for name, r, seed in [("a1", 4, 51), ("a2", 8, 52), ("a3", 4, 53), ("new", 64, 54)]
    }


def _files(src: Path, weights: bytes | None = None) -> dict:
    return {
        "adapter_config.json": ("adapter_config.json", (src / "adapter_config.json").read_bytes()),
        "adapter_model.safetensors": (
            "adapter_model.safetensors",
            weights if weights is not None else (src / "adapter_model.safetensors").read_bytes(),
        ),
    }


def _kill_when(srv: ServerProcess, directory: Path, prefix: str, timeout: float = 30) -> str:
    """SIGKILLs the server the moment an entry named ``prefix*`` shows up in ``directory``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with_prefix = [n for n in os.listdir(directory) if n.startswith(prefix)] if directory.exists() else []
        if with_prefix:
            srv.kill()
            return with_prefix[0]
        time.sleep(0.0005)
    srv.kill()
    raise AssertionError(f"no {prefix}* appeared in {directory}:\n{srv.log()}")


def _in_background(fn) -> threading.Thread:
    def run() -> None:
        with contextlib.suppress(httpx.HTTPError):  # the server was killed under it
            fn()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def _check_after_restart(srv: ServerProcess, store: Path, exports: Path, digests: dict[str, str]) -> None:
    """Every adapter on disk is complete (its digest is the uploaded one), listed and served; no
    leftovers; every export is complete."""
    on_disk = sorted(p.name for p in store.iterdir())
    assert all(not n.startswith(".") for n in on_disk), on_disk
    for name in on_disk:
        assert tree_digest(store / name) == digests[name], name
    listed = {m["id"] for m in httpx.get(f"{srv.url}/v1/models").json()["data"]} - {"tiny"}
    assert listed == set(on_disk)
    for name in on_disk:
        body = {"model": name, "prompt": [1, 2, 3], "max_tokens": 2}
        assert httpx.post(f"{srv.url}/v1/completions", json=body, timeout=30).status_code == 200, name
    for entry in exports.iterdir() if exports.exists() else []:
        assert not entry.name.startswith("."), entry
        assert {"config.json", "model.safetensors", "loraplex_merge.json"} <= {
            p.name for p in entry.iterdir()
        }


@pytest.mark.slow  # five server starts
def test_sigkill_during_upload_delete_and_merge_leaves_complete_or_absent(made, tiny_llama_dir, tmp_path):
    store, exports = tmp_path / "store", tmp_path / "exports"
    for name in ("a1", "a2", "a3"):
        shutil.copytree(made[name], store / name)
    digests = {name: tree_digest(made[name]) for name in made}
    args = ["--model", str(tiny_llama_dir), "--served-model-name", "tiny", "--device", "cpu",
            "--adapter-store", str(store), "--export-dir", str(exports), "--num-kv-blocks", "256",
            "--drain-timeout", "60", "--max-adapter-bytes", str(256 << 20)]  # fmt: skip
    log = tmp_path / "server.log"
    killed_at = []

    # 1. An upload being staged: a large file keeps the staging directory there for a while.
    srv = ServerProcess(args, log).start()
    junk = os.urandom(1 << 20) * 24
    _in_background(lambda: httpx.post(f"{srv.url}/v1/adapters", data={"name": "junk"},
                                      files=_files(made["new"], junk), timeout=60))  # fmt: skip
    killed_at.append(_kill_when(srv, store, ".staging-"))
    # 2. A valid upload, killed as soon as it stages (or, if it won the race, once it is published).
    srv = ServerProcess(args, log).start()
    _check_after_restart(srv, store, exports, digests)
    _in_background(lambda: httpx.post(f"{srv.url}/v1/adapters", data={"name": "new"},
                                      files=_files(made["new"]), timeout=60))  # fmt: skip
    killed_at.append(_kill_when(srv, store, ".staging-"))
    # 3. A delete waiting for a running request on the adapter (the directory is already in the trash).
    srv = ServerProcess(args, log).start()
    _check_after_restart(srv, store, exports, digests)
    _in_background(lambda: httpx.post(f"{srv.url}/v1/completions", timeout=60, json=dict(
        model="a2", prompt=[1, 2], max_tokens=500, ignore_eos=True, stream=False)))  # fmt: skip
    time.sleep(0.3)
    _in_background(lambda: httpx.delete(f"{srv.url}/v1/adapters/a2", timeout=60))
    killed_at.append(_kill_when(srv, store, ".trash-"))
    # 4. A merge export half-written.
    srv = ServerProcess(args, log).start()
    _check_after_restart(srv, store, exports, digests)
    _in_background(lambda: httpx.post(f"{srv.url}/v1/adapters/a1/merge", timeout=120))
    killed_at.append(_kill_when(srv, exports, "."))

    srv = ServerProcess(args, log).start()
    try:
        _check_after_restart(srv, store, exports, digests)
        assert not (store / "a2").exists()  # the delete had taken effect before the kill
        assert "junk" not in os.listdir(store)
        text = log.read_text()
        for prefix in (".staging-", ".trash-"):
            assert f"removed {prefix}" in text, text  # the restarts really cleaned up
        assert "removed .merge-" in text or "removed ..merge-" in text, text
        r = httpx.post(f"{srv.url}/v1/adapters/a1/merge", timeout=120)  # and the export works now
        assert r.status_code == 200, r.text
        _check_after_restart(srv, store, exports, digests)
    finally:
        srv.kill()
    print("killed at:", killed_at)
