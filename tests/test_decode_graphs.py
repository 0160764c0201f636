"""Decode buckets, padding and replay on the CPU (eager replay of the padded static buffers).

CUDA graphs themselves need a GPU (``make gpu-check`` compares graphs on and off there); what is
tested here is everything around them: the buckets, padding a step into the persistent buffers, the
padding block, the LoRA rows of padded steps, falling back to eager steps, and that a padded decode
gives the same tokens as an unpadded one (and as transformers/PEFT).
"""

from __future__ import annotations

import pytest
import torch

from server.engine.decode_graphs import DecodeGraphs, EagerReplay, bucket_sizes
from server.engine.sequence import Sequence
from tests.engine_utils import (
    CountingReplay,
    build_engine,
    build_test_runtime,
    greedy,
    random_prompts,
    reference_greedy,
    run_staggered,
    with_decode_replay,
)
from tests.lora_fixtures import ALL_LINEAR, make_peft_adapter


@pytest.mark.parametrize(
    "max_num_seqs,buckets",
    [(1, [1]), (2, [1, 2]), (8, [1, 2, 4, 8]), (10, [1, 2, 4, 8, 10]), (16, [1, 2, 4, 8, 16]),
     (40, [1, 2, 4, 8, 16, 24, 32, 40]), (50, [1, 2, 4, 8, 16, 24, 32, 40, 48, 50])],
)  # fmt: skip
def test_bucket_sizes(max_num_seqs, buckets):
    assert bucket_sizes(max_num_seqs) == buckets


def test_bucket_for_and_disable():
    graphs = DecodeGraphs(EagerReplay(), [1, 2, 4, 8])
    assert [graphs.bucket_for(n) for n in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, None]
    graphs.disable("test")
    assert not graphs.active and graphs.bucket_for(1) is None


def test_failed_capture_turns_replay_off():
    class Broken(EagerReplay):
        def capture(self, forward):
            raise RuntimeError("operation not permitted when stream is capturing")

    graphs = DecodeGraphs(Broken(), [1, 2])
    graphs.capture_all(lambda size: None, lambda size: torch.zeros(size))
    assert not graphs.active and "capturing" in graphs.disabled_reason


def test_padded_decode_matches_transformers(tiny_llama_dir):
    """Staggered joins give decode batches of 1 to 4 sequences: buckets 1, 2 and 4 replay."""
    prompts = random_prompts([5, 17, 3, 9, 12])
    want = reference_greedy(tiny_llama_dir, prompts, 8)
    engine = build_engine(tiny_llama_dir, enable_lora=False, max_num_seqs=8, max_num_batched_tokens=64,
                          num_kv_blocks=64, block_size=4)  # fmt: skip
    replay = CountingReplay()
    runner = with_decode_replay(engine, replay)
    assert runner.attention.padding_block == engine.core.block_manager.num_blocks  # never handed out
    seqs = [Sequence(f"r{i}", p, greedy(8)) for i, p in enumerate(prompts)]
    got = run_staggered(engine.core, seqs, join_every=2)
    assert [got[s.request_id] for s in seqs] == want
    assert {1, 2, 4} <= set(replay.runs)


def test_padded_mixed_lora_decode_matches_unpadded(tiny_llama_dir, tmp_path):
    """Adapter rows, base rows and padding rows in one padded step: tokens as without padding."""
    store = tmp_path / "store"
    for i in range(2):
        make_peft_adapter(tiny_llama_dir, store / f"a{i}", r=8, target_modules=ALL_LINEAR, seed=i)
    prompts = random_prompts([4, 11, 7, 6, 9], seed=3)
    names = ["a0", None, "a1", "a0", "a1"]
    outputs = []
    for replay in (None, CountingReplay()):
        rt = build_test_runtime(tiny_llama_dir, adapter_store=store, max_loras=2, max_num_seqs=8,
                                num_kv_blocks=64, block_size=4)  # fmt: skip
        if replay is not None:
            with_decode_replay(rt.engine, replay)
        seqs = [
            Sequence(f"r{i}", p, greedy(6), rt.adapters.resolve(n) if n else None)
            for i, (n, p) in enumerate(zip(names, prompts, strict=True))
        ]
        outputs.append(run_staggered(rt.engine.core, seqs, join_every=1))
        rt.close()
    assert outputs[1] == outputs[0]
    assert replay.runs  # the padded path really ran


def test_graph_strategy_needs_a_capturable_backend(tiny_llama_dir):
    """The torch attention backend without its native decode kernel (the SDPA reference) builds fresh
    tensors in plan: a graph could not replay it."""
    engine = build_engine(tiny_llama_dir, enable_lora=False, max_num_seqs=4, num_kv_blocks=32)
    engine.core.runner.attention.supports_cuda_graphs = False  # as where the kernel cannot be built
    runner = with_decode_replay(engine, CountingReplay(needs_static_backends=True))
    assert not runner.graphs.active and "cannot be captured" in runner.graphs.disabled_reason
    seqs = [Sequence("r", [5, 6, 7], greedy(3))]
    assert len(run_staggered(engine.core, seqs)["r"]) == 3  # eager steps still serve
