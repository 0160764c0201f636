"""A server under test as a subprocess on 127.0.0.1: started, waited for (/ready), stopped, logged.

Used by the benchmarks that drive a real server over HTTP (``many_adapters``) and by
``scripts/compare_baseline.py``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

from clients import LoraplexClient

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A server subprocess on 127.0.0.1; waits for /ready, terminates on exit, keeps its log."""

    def __init__(
        self,
        label: str,
        argv: list[str],
        port: int,
        log: Path,
        env: dict | None = None,
        threads: int | None = None,
    ) -> None:
        self.label, self.argv, self.port, self.log_path = label, argv, port, log
        self.env = {**os.environ, **(env or {})}
        if threads:
            self.env["OMP_NUM_THREADS"] = str(threads)  # torch's intra-op threads in the server
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> ServerProcess:
        self.log = open(self.log_path, "w")  # noqa: SIM115 - closed in __exit__
        self.proc = subprocess.Popen(
            self.argv, stdout=self.log, stderr=subprocess.STDOUT, env=self.env, cwd=REPO
        )
        deadline = time.monotonic() + 600
        with LoraplexClient(self.url, timeout=5) as probe:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.label} exited early; see {self.log_path}")
                if probe.ready():
                    return self
                time.sleep(0.5)
        raise TimeoutError(f"{self.label} not ready after 600 s; see {self.log_path}")

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
