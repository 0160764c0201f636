"""Server subprocesses for benchmarks: start on loopback, wait until ready, keep the log, stop on exit."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_ok(url: str) -> Callable[[], bool]:
    """A readiness probe: ``url`` answers 200 (loraplex's ``/ready``, vLLM's and llama.cpp's ``/health``)."""

    def probe() -> bool:
        try:
            return httpx.get(url, timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    return probe


class ServerProcess:
    """A server subprocess on 127.0.0.1; waits for ``ready`` (default: loraplex's ``/ready``), terminates
    on exit, keeps its log. ``ready_s`` is the time from spawn to the first successful probe."""

    def __init__(
        self,
        label: str,
        argv: list[str],
        port: int,
        log: Path,
        env: dict | None = None,
        threads: int | None = None,
        ready: Callable[[], bool] | None = None,
        timeout_s: float = 600,
    ) -> None:
        self.label, self.argv, self.port, self.log_path = label, argv, port, log
        self.env = {**os.environ, **(env or {})}
        if threads:
            self.env["OMP_NUM_THREADS"] = str(threads)  # torch's intra-op threads in the server
        self.url = f"http://127.0.0.1:{port}"
        self.ready = ready or http_ok(self.url + "/ready")
        self.timeout_s = timeout_s
        self.proc: subprocess.Popen | None = None
        self.ready_s: float | None = None

    def __enter__(self) -> ServerProcess:
        self.log = open(self.log_path, "w")  # noqa: SIM115 - closed in __exit__
        start = time.monotonic()
        self.proc = subprocess.Popen(
            self.argv, stdout=self.log, stderr=subprocess.STDOUT, env=self.env, cwd=REPO
        )
        while time.monotonic() - start < self.timeout_s:
            if self.proc.poll() is not None:
                self.log.close()
                raise RuntimeError(f"{self.label} exited early; see {self.log_path}")
            if self.ready():
                self.ready_s = time.monotonic() - start
                return self
            time.sleep(0.5)
        self.__exit__()
        raise TimeoutError(f"{self.label} not ready after {self.timeout_s:.0f} s; see {self.log_path}")

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if not self.log.closed:
            self.log.close()
