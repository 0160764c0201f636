"""Decode steps at fixed batch-size buckets, replayed by a pluggable capture strategy.

A decode step of ``n`` sequences is padded to the smallest bucket ``B >= n`` (1, 2, 4, 8, then
every 8 up to ``max_num_seqs``); its inputs live in the runner's persistent step buffers, so the
forward of bucket ``B`` always reads the same addresses with the same shapes. A ``CaptureStrategy``
turns "run the forward of bucket B" into a replayable callable once per bucket:

* ``CudaGraphCapture`` records a CUDA graph (one shared memory pool for all buckets): the ~90
  kernel launches per layer of a decode step become one graph launch.
* ``EagerReplay`` runs the same forward eagerly each time. It is the ``--enforce-eager`` path on
  CUDA (the same padded shapes and kernels, so outputs are bit-identical with graphs on and off)
  and lets the bucket and padding logic run, and be tested, on the CPU.
* ``CompiledDecode`` (the CPU's): ``torch.compile`` of the decode forward, one graph with a dynamic
  batch dimension for every bucket (dynamo specializes bucket 1), so start-up compiles twice, not
  once per bucket; inductor fuses the norms, RoPE and activations and the Python of the HF modules
  disappears from the step. Its ``compile_forward`` hook wraps the runner's model call.

``needs_static_backends``: a strategy that freezes launches (graphs) can only replay backends whose
``plan`` writes into persistent buffers and whose kernels size their launches from the bucket. The
model runner checks that (attention's ``supports_cuda_graphs``, the LoRA side's ``graph_safe``)
before taking this path, and runs the step eagerly, unpadded, when it does not hold.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Protocol

import torch

log = logging.getLogger(__name__)

Forward = Callable[[], torch.Tensor]


def bucket_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, 16, 24, 32, ... up to ``max_num_seqs`` (which is always the last bucket)."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_num_seqs]
    sizes += list(range(16, max_num_seqs, 8))
    return [*sizes, max_num_seqs]


class CaptureStrategy(Protocol):
    name: str
    needs_static_backends: bool

    def capture(self, forward: Forward) -> Forward:
        """Returns a callable that runs ``forward`` (reading the step buffers as they are then)."""
        ...

    # optional: ``compile_forward(fn) -> fn``, applied once to the runner's model call


class EagerReplay:
    """Runs the bucket's forward eagerly each step: no capture, same shapes as the graphs."""

    name = "eager"
    needs_static_backends = False

    def capture(self, forward: Forward) -> Forward:
        return forward


class CompiledDecode:
    """torch.compile'd decode for the CPU. ``compile_forward`` wraps the runner's model call once
    (dynamic batch dimension); ``capture`` runs each bucket twice at start-up (the compile, then a
    check that it replays without recompiling), timing it. Inductor's caches (``TORCHINDUCTOR_CACHE_DIR``,
    default under /tmp) make a restart reuse the compiled code."""

    name = "compiled"
    needs_static_backends = True  # the graph freezes the backends' Python decisions, as a CUDA graph does

    def __init__(self) -> None:
        self.compile_seconds = 0.0

    def compile_forward(self, forward: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        return torch.compile(forward, dynamic=True)

    def capture(self, forward: Forward) -> Forward:
        start = time.perf_counter()
        forward()
        forward()
        self.compile_seconds += time.perf_counter() - start

        def replay() -> torch.Tensor:
            # Guards are checked only to pick among the compiled entries (~1 ms of a decode step
            # otherwise): what they would re-check is fixed for a bucket step (static backends;
            # DoRA/lora_bias slots keep steps off the buckets, see ModelRunner._decode_bucket).
            with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
                return forward()

        return replay


class CudaGraphCapture:
    """One CUDA graph per bucket, all in one memory pool (buckets are captured largest first)."""

    name = "cuda-graph"
    needs_static_backends = True

    def __init__(self) -> None:
        self.pool = torch.cuda.graph_pool_handle()

    def capture(self, forward: Forward) -> Forward:
        side = torch.cuda.Stream()  # warm-up off the default stream, as graph capture requires
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                forward()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            output = forward()

        def replay() -> torch.Tensor:
            graph.replay()
            return output

        return replay


class DecodeGraphs:
    """The replayable forward of every bucket, and which bucket a step of ``n`` sequences uses."""

    def __init__(self, strategy: CaptureStrategy, buckets: list[int]) -> None:
        self.strategy = strategy
        self.buckets = sorted(buckets)
        self.replays: dict[int, Forward] = {}
        self.disabled_reason: str | None = None

    @property
    def active(self) -> bool:
        return self.disabled_reason is None

    def bucket_for(self, num_seqs: int) -> int | None:
        """The smallest bucket holding ``num_seqs`` sequences (None: more than the largest)."""
        if not self.active:
            return None
        return next((b for b in self.buckets if b >= num_seqs), None)

    def disable(self, reason: str) -> None:
        if self.disabled_reason is None:
            log.warning("decode %s replay off: %s; decode runs eagerly", self.strategy.name, reason)
        self.disabled_reason = reason
        self.replays.clear()

    def capture_all(self, prepare: Callable[[int], None], forward: Callable[[int], torch.Tensor]) -> None:
        """``prepare(B)`` fills the step buffers with a dummy step of bucket B, then its forward is
        captured. Largest first, so smaller graphs reuse the pool's blocks. A failed capture turns
        replay off (the server still serves, eagerly) rather than failing start-up."""
        for size in sorted(self.buckets, reverse=True):
            try:
                prepare(size)
                self.replays[size] = self.strategy.capture(lambda size=size: forward(size))
            except Exception as exc:  # a capture-unsafe op somewhere in the model: serve eagerly
                log.exception("capturing the decode step of bucket %d failed", size)
                self.disable(f"capture of bucket {size} failed: {exc}")
                return

    def run(self, bucket: int) -> torch.Tensor:
        """Logits [bucket, vocab] of the step whose inputs are in the step buffers now."""
        return self.replays[bucket]()
