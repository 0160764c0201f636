"""Progress display while a load run is in flight: tqdm when installed, else a plain status line."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from clients.loadgen.record import RequestRecord


class Progress:
    """Counts finished requests; call :meth:`update` per record and :meth:`close` at the end."""

    def __init__(self, total: int, *, enabled: bool = True, desc: str = "load", stream: TextIO | None = None):
        self.total, self.enabled, self.desc = total, enabled, desc
        self.stream = stream or sys.stderr
        self.done = self.errors = 0
        self._bar = None
        self._last = 0.0
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self._bar = tqdm(total=total, desc=desc, unit="req", file=self.stream, dynamic_ncols=True)

    def update(self, record: RequestRecord) -> None:
        self.done += 1
        self.errors += 0 if record.ok else 1
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(errors=self.errors, refresh=False)
            return
        now = time.monotonic()
        if now - self._last >= 0.5 or self.done == self.total:
            self._last = now
            self.stream.write(f"\r{self.desc}: {self.done}/{self.total} done, {self.errors} errors")
            self.stream.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.enabled:
            self.stream.write("\n")
            self.stream.flush()
