"""The parent's side of a worker process (see protocol.py): start, wait for ready, call, stop."""

from __future__ import annotations

import json
import queue
import subprocess
import threading
from pathlib import Path

from benchmarks.peers.protocol import parse
from benchmarks.servers import REPO


class WorkerError(RuntimeError):
    pass


class Worker:
    """One system's engine, alive across rounds so each is built (and compiled) once."""

    def __init__(self, label: str, argv: list, env: dict, log: Path, timeout_s: float = 900) -> None:
        self.label, self.argv, self.env, self.log_path, self.timeout_s = label, argv, env, log, timeout_s
        self.messages: queue.Queue = queue.Queue()
        self.start_s: float | None = None

    def start(self) -> float:
        self.log = open(self.log_path, "w")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [str(a) for a in self.argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self.log, env=self.env, cwd=REPO, text=True, bufsize=1,
        )  # fmt: skip
        threading.Thread(target=self._pump, daemon=True).start()
        self.start_s = self._receive("ready")["start_s"]
        return self.start_s

    def _pump(self) -> None:
        for line in self.proc.stdout:
            message = parse(line)
            if message is None:
                self.log.write(line)
            else:
                self.messages.put(message)
        self.messages.put({"op": "exit"})

    def _receive(self, op: str) -> dict:
        try:
            message = self.messages.get(timeout=self.timeout_s)
        except queue.Empty:
            raise WorkerError(
                f"{self.label}: no answer in {self.timeout_s:.0f} s; see {self.log_path}"
            ) from None
        if message["op"] == "exit":
            raise WorkerError(f"{self.label} exited; see {self.log_path}")
        if "error" in message:
            raise WorkerError(f"{self.label} {op}: {message['error']}")
        return message

    def call(self, op: str, **args) -> dict:
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.proc.stdin.flush()
        return self._receive(op)

    def run(self, mode: str, round_: int = 1) -> dict:
        return self.call("run", mode=mode, round=round_)

    def probe(self, tokens: int) -> dict:
        return self.call("probe", tokens=tokens)

    def close(self) -> None:
        if getattr(self, "proc", None) is None:
            return
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self.log.close()
