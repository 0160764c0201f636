"""Per-app state shared by the routes: settings, auth, metrics, and the runtime once it is up.

One :class:`AppState` lives on ``app.state.loraplex``; nothing here is module-global, so several
apps (tests, replicas in one process) never share anything.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from fastapi import Request

from server.api.auth import Authenticator
from server.api.errors import APIError
from server.config import Settings
from server.metrics import ServerMetrics

if TYPE_CHECKING:
    from server.bootstrap import Runtime

T = TypeVar("T")


@dataclass
class AppState:
    settings: Settings
    auth: Authenticator
    metrics: ServerMetrics
    runtime: Runtime | None = None  # set once built
    boot_error: str | None = None
    draining: bool = False  # set on SIGTERM: /ready and new requests answer 503 from then on
    # Fast tokenizers are not safe to call from several threads at once ("Already borrowed"),
    # so all tokenization runs on one worker thread, off the event loop.
    tokenizer_pool: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=1, thread_name_prefix="loraplex-tokenize")
    )

    def ready_runtime(self) -> Runtime:
        """The runtime if its engine is loaded and warm; 503 (retryable) otherwise."""
        runtime = self.runtime
        if self.draining:
            raise APIError(503, "the server is shutting down", headers={"Retry-After": "1"})
        if runtime is None or not runtime.engine.ready:
            detail = (
                f"engine failed to start: {self.boot_error}" if self.boot_error else "engine is not ready"
            )
            raise APIError(503, detail, headers={"Retry-After": "1"})
        return runtime

    async def on_tokenizer_thread(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.tokenizer_pool, fn, *args)


def app_state(request: Request) -> AppState:
    return request.app.state.loraplex
