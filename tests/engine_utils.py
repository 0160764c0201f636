"""Helpers to drive the engine synchronously and to get transformers' reference outputs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from server.bootstrap import Runtime, build_runtime
from server.config import Settings
from server.engine.async_engine import AsyncEngine
from server.engine.sequence import Sequence
from server.engine.types import SamplingParams


def build_test_runtime(model_dir: Path, **overrides) -> Runtime:
    """What the server runs for ``Settings(model=model_dir, **overrides)``."""
    return build_runtime(Settings(model=model_dir, **overrides))


def build_engine(model_dir: Path, **overrides) -> AsyncEngine:
    """An AsyncEngine whose core (``.core``) tests may step by hand, without the thread."""
    return build_test_runtime(model_dir, **overrides).engine


def random_prompts(lengths: list[int], vocab: int = 512, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def reference_greedy(model_dir: Path, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """transformers' own greedy generate, one prompt at a time (the oracle)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    # No EOS at all (rather than min_new_tokens, which masks EOS's logit): the engine runs these
    # with ignore_eos, which keeps going past an EOS but still emits it if it is the argmax.
    model.generation_config.eos_token_id = None
    outs = []
    with torch.inference_mode():
        for p in prompts:
            ids = model.generate(
                torch.tensor([p]),
                max_new_tokens=max_new_tokens,
                do_sample=False,
            )
            outs.append(ids[0, len(p) :].tolist())
    return outs


def run_staggered(engine, seqs: list[Sequence], join_every: int = 1) -> dict[str, list[int]]:
    """Adds one sequence every ``join_every`` steps while others decode; returns token ids per request."""
    return run_queued(engine, seqs, join_every=join_every).outputs


@dataclass
class QueuedRun:
    outputs: dict[str, list[int]]  # token ids per request
    first_step: dict[str, int]  # the step each request got its first token in
    finished: set[str]


def run_queued(
    engine, seqs: list[Sequence], max_steps: int | None = None, join_every: int | None = None
) -> QueuedRun:
    """Queues every sequence before the first step (``join_every``: one every that many steps instead,
    while others decode), then steps until no work is left (or ``max_steps``, for a test that must not
    hang on a request that never runs)."""
    pending = list(seqs)
    if join_every is None:
        for seq in pending:
            engine.add(seq)
        pending = []
    run = QueuedRun({s.request_id: [] for s in seqs}, {}, set())
    step = 0
    while (pending or engine.has_work()) and (max_steps is None or step < max_steps):
        if pending and step % join_every == 0:
            engine.add(pending.pop(0))
        for seq, out in engine.step():
            run.outputs[seq.request_id].extend(out.new_token_ids)
            run.first_step.setdefault(seq.request_id, step)
            if out.finished:
                run.finished.add(seq.request_id)
        step += 1
    return run


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kw)


def with_decode_replay(engine: AsyncEngine, strategy, buckets: list[int] | None = None):
    """Rebuilds ``engine``'s model runner around the same model, cache and adapters with decode steps
    padded to buckets and run through ``strategy`` (e.g. ``EagerReplay`` on the CPU); returns it."""
    from server.engine.decode_graphs import DecodeGraphs, bucket_sizes
    from server.engine.model_runner import ModelRunner

    old = engine.core.runner
    limits = old.inputs.limits
    runner = ModelRunner(
        old.model,
        old.attention,
        old.lora,
        max_num_seqs=limits.max_num_seqs,
        max_num_batched_tokens=limits.max_num_tokens,
        max_model_len=limits.max_blocks_per_seq * limits.block_size,
        graphs=DecodeGraphs(strategy, buckets or bucket_sizes(limits.max_num_seqs)),
    )
    runner.capture_decode_graphs()
    engine.core.runner = runner
    return runner


class CountingReplay:
    """``EagerReplay`` that counts the steps replayed per bucket (and can pose as a graph strategy)."""

    def __init__(self, needs_static_backends: bool = False) -> None:
        self.name = "counting"
        self.needs_static_backends = needs_static_backends
        self.runs: dict[int, int] = {}

    def capture(self, forward):
        def replay():
            out = forward()
            self.runs[out.shape[0]] = self.runs.get(out.shape[0], 0) + 1
            return out

        return replay
