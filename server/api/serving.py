"""Runs the app under uvicorn with a drain on SIGTERM.

Plain uvicorn, on SIGTERM, closes its listening socket at once, waits for open responses up to its
graceful timeout and then cancels them: streams are cut mid-chunk and cancellation tracebacks land in
the log. Here the first SIGTERM (or Ctrl-C) drains the app first, while it still listens: ``/ready`` and
new requests answer 503 at once, running requests get ``drain_timeout_s`` to finish, those left end
with an error (an SSE error event and ``data: [DONE]``, or a 503 body). Only then does uvicorn stop,
with nothing left to cancel. A second signal stops at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from types import FrameType

import uvicorn
from fastapi import FastAPI

from server.api.state import AppState

log = logging.getLogger(__name__)

# After the drain, how long responses already ended get to flush their last bytes before uvicorn
# cancels what is left (admin operations outliving the drain: a merge export, an upload).
FLUSH_TIMEOUT_S = 5


async def drain(state: AppState) -> int:
    """Refuses new requests (503) and lets running ones finish within ``drain_timeout_s``; the rest end
    with a 503 error. Returns how many requests were cut at the deadline."""
    state.draining = True
    runtime = state.runtime
    if runtime is None:
        return 0
    start = time.monotonic()
    log.info("draining: refusing new requests, %.1f s for running ones", state.settings.drain_timeout_s)
    cut = await runtime.engine.drain(state.settings.drain_timeout_s)
    log.info("drained in %.2f s; %d request(s) ended at the deadline", time.monotonic() - start, cut)
    return cut


class DrainingServer(uvicorn.Server):
    """uvicorn's server, with the first exit signal turned into ``drain`` then a normal stop."""

    def __init__(self, config: uvicorn.Config, drain: Callable[[], Awaitable[object]]) -> None:
        super().__init__(config)
        self._drain = drain
        self._signal: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining: asyncio.Future | None = None

    async def startup(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets=sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._signal is None and self._loop is not None and not self.should_exit:
            self._signal = sig  # runs in the signal handler: only schedule the drain
            self._loop.call_soon_threadsafe(self._start_drain)
        else:
            super().handle_exit(sig, frame)

    def _start_drain(self) -> None:
        self._draining = asyncio.ensure_future(self._drain_then_stop())

    async def _drain_then_stop(self) -> None:
        try:
            await self._drain()
        except Exception:
            log.exception("drain failed; stopping anyway")
        finally:
            super().handle_exit(self._signal, None)  # uvicorn's own stop, and the signal re-raised at exit


def serve(app: FastAPI, host: str, port: int, log_level: str) -> None:
    """Serves ``app`` (from ``create_app``) until SIGTERM / Ctrl-C, draining first."""
    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=FLUSH_TIMEOUT_S
    )
    state: AppState = app.state.loraplex
    DrainingServer(config, lambda: drain(state)).run()
