"""``python -m tests.fault_server serve <loraplex serve flags>``: the real server with the engine's fault
seam armed - each step fails with probability ``$FAULT_RATE`` with an error whose message carries
``INJECTED`` - so a soak can tell injected 5xx from real ones. Tests only.
"""

from __future__ import annotations

import os
import random
import sys

from server.engine.faults import FaultPoint

INJECTED = "injected soak fault"


class RandomFaults:
    def __init__(self, rate: float, seed: int = 0) -> None:
        self.rate = rate
        self.random = random.Random(seed)
        self.fired = 0

    def at(self, point: FaultPoint, seqs) -> None:
        if point is FaultPoint.FORWARD and self.random.random() < self.rate:
            self.fired += 1
            raise RuntimeError(f"{INJECTED} #{self.fired}")


def main(argv: list[str]) -> int:
    from server.cli import build_parser, prepare_server_process, settings_from_args

    ns = build_parser().parse_args(argv)
    settings = settings_from_args(ns)
    prepare_server_process(settings, ns.log_level)  # as `loraplex serve`: tuned allocator and OpenMP

    from server.api.app import create_app
    from server.api.serving import serve
    from server.bootstrap import build_runtime

    runtime = build_runtime(settings)
    runtime.engine.core.faults = RandomFaults(float(os.environ.get("FAULT_RATE", "0")))
    serve(create_app(settings, runtime), settings.host, settings.port, ns.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
