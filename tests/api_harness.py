"""Runs the real app under uvicorn on 127.0.0.1 in a background thread, for end-to-end API tests."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import httpx
import uvicorn

from server.api.app import create_app
from server.config import Settings


class LiveServer:
    """``with LiveServer(settings) as srv:`` -> ``srv.url``, ``srv.engine``; stops (and drains) on exit."""

    def __init__(self, settings: Settings, runtime=None, ready_timeout: float = 120.0) -> None:
        self.settings = settings
        self.app = create_app(settings, runtime)
        self.ready_timeout = ready_timeout
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            self.app,
            loop="asyncio",
            http="h11",
            lifespan="on",
            log_level="warning",
            timeout_graceful_shutdown=60,
        )
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]}, daemon=True)

    @property
    def state(self):
        return self.app.state.loraplex

    @property
    def runtime(self):
        return self.state.runtime

    @property
    def engine(self):
        return self.runtime.engine if self.runtime is not None else None

    def client(self, timeout: float = 120) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout)

    def start(self) -> LiveServer:
        self._thread.start()
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.state.boot_error:
                raise RuntimeError(self.state.boot_error)
            if self.server.started:
                try:
                    if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
                        return self
                except httpx.HTTPError:
                    pass
            time.sleep(0.05)
        raise TimeoutError("server did not become ready")

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=90)
        self._sock.close()

    def __enter__(self) -> LiveServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def tree_hash(root: Path) -> dict[str, bytes]:
    """Every file (relative path -> bytes) and every directory under ``root``: byte-level store state."""
    out: dict[str, bytes] = {}
    for path in sorted(Path(root).rglob("*")):
        rel = path.relative_to(root).as_posix()
        out[rel] = path.read_bytes() if path.is_file() else b"<dir>"
    return out


CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant:{% endif %}"
)


def copy_model_with_chat_template(src: Path, dst: Path) -> Path:
    """A copy of the tiny model whose tokenizer carries a (simple) chat template."""
    import shutil

    from transformers import AutoTokenizer

    shutil.copytree(src, dst)
    tok = AutoTokenizer.from_pretrained(dst)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(dst)
    return dst


def peft_model(
    base_dir: Path, adapters: dict[str, Path] | None = None, weights: dict[str, float] | None = None
):
    """The oracle: transformers + PEFT, one adapter, or a weighted 'cat' composition of several."""
    from peft import PeftModel

    from tests.lora_fixtures import load_base

    model = load_base(base_dir)
    if not adapters:
        return model
    names = list(adapters)
    model = PeftModel.from_pretrained(model, adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapters[name], adapter_name=name)
    if weights:
        model.add_weighted_adapter(names, [weights[n] for n in names], "composed", combination_type="cat")
        model.set_adapter("composed")
    else:
        model.set_adapter(names[0])
    return model.eval()


def greedy_ids(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Plain greedy decoding with a full forward per token (no cache, no EOS handling)."""
    import torch

    ids = list(prompt)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
            ids.append(int(logits.argmax()))
    return ids[len(prompt) :]


def token_ids_of(logprobs: dict) -> list[int]:
    """Ids from completions logprobs rendered with ``return_tokens_as_token_ids``."""
    return [int(t.split(":", 1)[1]) for t in logprobs["tokens"]]
