"""The CPU image, built and run for real with podman (docker/podman-build.sh): it becomes ready on a
mounted model, takes a PEFT adapter upload into the mounted store, serves a completion from it that
matches transformers + PEFT token for token, and stops cleanly on SIGTERM.

Run with ``make container-test`` (``pytest -m container``); needs root for podman (the helper installs
podman, runc and debootstrap from Debian when missing). The container runs like the Kubernetes pod:
read-only root filesystem, all capabilities dropped, non-root, config only through LORAPLEX_* env vars.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import httpx
import pytest

from tests.api_harness import greedy_ids, peft_model, token_ids_of
from tests.lora_fixtures import make_peft_adapter
from tests.server_process import free_port

pytestmark = [pytest.mark.container, pytest.mark.timeout(1800)]

ROOT = Path(__file__).resolve().parent.parent
HELPER = ROOT / "docker" / "podman-build.sh"
IMAGE = "localhost/loraplex:test"
DEMO_MODEL = ROOT / "models" / "demo"
USER_KEY, ADMIN_KEY = "user-key-ct", "admin-key-ct"
PROMPT = [5, 77, 301, 12, 9, 140]
NEW = 8


def podman(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    out = subprocess.run(
        [str(HELPER), "podman", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and out.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}")
    return out


@pytest.fixture(scope="module")
def image() -> str:
    if os.geteuid() != 0:
        pytest.fail("the container test drives podman as root (as CI does)")
    started = time.monotonic()
    out = subprocess.run([str(HELPER), "build", IMAGE], capture_output=True, text=True, timeout=1500)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    size = int(podman("image", "inspect", "--format", "{{.Size}}", IMAGE).stdout)
    print(f"\nimage {IMAGE}: {size / 1e6:.0f} MB, build {time.monotonic() - started:.0f} s (cache reused)")
    return IMAGE


@pytest.fixture(scope="module")
def model_dir(request) -> Path:
    """The demo model when it has been trained into models/demo, else the tiny test model."""
    if (DEMO_MODEL / "config.json").exists():
        return DEMO_MODEL
    return request.getfixturevalue("tiny_llama_dir")


def test_help_runs_in_the_image(image):
    out = podman("run", "--rm", "--health-interval=disable", image, "--help")
    assert "serve" in out.stdout and "merge" in out.stdout
    out = podman("run", "--rm", "--health-interval=disable", "--entrypoint", "id", image, "-u")
    assert out.stdout.strip() == "10001"


def readable_copy(src: Path, dst: Path) -> Path:
    """The model as an operator would mount it: readable by the image's non-root user (safetensors
    files are written 0600 by their owner, which uid 10001 in the container is not)."""
    shutil.copytree(src, dst)
    for path in [dst, *dst.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return dst


def test_serve_upload_complete_and_stop(image, model_dir, tmp_path):
    model_dir = readable_copy(model_dir, tmp_path / "model")
    store = tmp_path / "store"
    store.mkdir()
    store.chmod(0o777)  # written by the image's uid 10001, as a PVC with fsGroup would allow
    adapter = make_peft_adapter(model_dir, tmp_path / "made" / "ct-adapter", r=8, seed=11)
    port = free_port()
    name = f"loraplex-ct-{uuid.uuid4().hex[:8]}"
    env = {
        "LORAPLEX_HOST": "127.0.0.1",
        "LORAPLEX_PORT": str(port),
        "LORAPLEX_DEVICE": "cpu",
        "LORAPLEX_DTYPE": "float32",  # token-for-token against PEFT in fp32 (auto may pick bf16 on this CPU)
        "LORAPLEX_API_KEYS": json.dumps([USER_KEY]),
        "LORAPLEX_ADMIN_KEYS": json.dumps([ADMIN_KEY]),
        "LORAPLEX_NUM_KV_BLOCKS": "256",
        "LORAPLEX_MAX_MODEL_LEN": "256",
    }
    run = ["run", "-d", "--name", name, "--network", "host", "--health-interval=disable"]
    run += ["--read-only", "--tmpfs", "/exports", "--tmpfs", "/home/loraplex/.cache"]
    run += ["--cap-drop", "ALL", "--security-opt", "no-new-privileges"]
    run += ["-v", f"{model_dir}:/models/demo:ro", "-v", f"{store}:/adapters"]
    for key, value in env.items():
        run += ["-e", f"{key}={value}"]
    podman(*run, image)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(name, url)
        _check_serving(name, url, store, model_dir, adapter)
        stop = podman("stop", "--time", "60", name, timeout=90)
        assert stop.returncode == 0
        state = json.loads(podman("inspect", "--format", "{{json .State}}", name).stdout)
        logs = podman("logs", name).stdout + podman("logs", name).stderr
        assert state["ExitCode"] == 0, logs[-3000:]  # SIGTERM -> graceful shutdown, not a SIGKILL (137)
    finally:
        podman("rm", "--force", "--time", "0", name, check=False)


def wait_ready(name: str, url: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = podman("inspect", "--format", "{{.State.Status}}", name).stdout.strip()
        if status != "running":
            out = podman("logs", name)
            raise AssertionError(f"container {status}:\n{out.stdout[-3000:]}{out.stderr[-3000:]}")
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return
            health = httpx.get(f"{url}/health", timeout=2)
            if health.status_code != 200:  # the engine failed to start: no point waiting
                out = podman("logs", name)
                raise AssertionError(f"{health.text}\n{out.stdout[-3000:]}{out.stderr[-3000:]}")
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError("container did not become ready")


def _check_serving(name: str, url: str, store: Path, model_dir: Path, adapter: Path) -> None:
    # the image's own HEALTHCHECK (python urllib against /health) passes
    assert podman("healthcheck", "run", name, check=False).returncode == 0

    metrics = httpx.get(f"{url}/metrics", timeout=10).text
    for metric in ("vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc"):
        assert metric in metrics

    files = {f: (f, (adapter / f).read_bytes()) for f in ("adapter_config.json", "adapter_model.safetensors")}
    user = {"Authorization": f"Bearer {USER_KEY}"}
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    with httpx.Client(base_url=url, timeout=120) as http:
        assert http.get("/v1/models").status_code == 401  # keys from the env JSON lists are enforced
        denied = http.post("/v1/adapters", data={"name": "ct-adapter"}, files=files, headers=user)
        assert denied.status_code == 403, denied.text
        r = http.post("/v1/adapters", data={"name": "ct-adapter"}, files=files, headers=admin)
        assert r.status_code == 201, r.text
        assert (store / "ct-adapter" / "adapter_model.safetensors").exists()  # in the mounted volume
        assert "ct-adapter" in {m["id"] for m in http.get("/v1/models", headers=user).json()["data"]}

        body = dict(
            model="ct-adapter",
            prompt=PROMPT,
            max_tokens=NEW,
            temperature=0,
            ignore_eos=True,
            logprobs=0,
            return_tokens_as_token_ids=True,
        )
        r = http.post("/v1/completions", json=body, headers=user)
        assert r.status_code == 200, r.text
        got = token_ids_of(r.json()["choices"][0]["logprobs"])
    expected = greedy_ids(peft_model(model_dir, {"ct-adapter": adapter}), PROMPT, NEW)
    assert got == expected
    assert got != greedy_ids(peft_model(model_dir), PROMPT, NEW), "adapter had no effect on the output"
    shutil.rmtree(store / "ct-adapter", ignore_errors=True)
