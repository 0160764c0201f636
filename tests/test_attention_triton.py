"""Triton paged attention, run on CPU by Triton's interpreter, against the torch reference backend.

Like tests/test_lora_triton.py, the kernel tests run in a child pytest under Triton's interpreter
(``tests/triton_child.py``).
Shapes are tiny (the interpreter runs every program in numpy) but cover what breaks paged kernels:
ragged lengths, GQA, a cached prefix, block boundaries and a partial last block, contexts longer
than one decode split, sliding windows, soft-capping, a static (graph-bucket) plan, and a whole
engine on the tiny model against transformers' greedy output.
"""

from __future__ import annotations

import pytest
import torch

from server.model.attention import SeqSpan, StepLayout
from server.model.attention.torch_paged import TorchPagedAttention
from server.model.geometry import ModelGeometry
from tests.triton_child import only_in_child, run_child


def test_triton_attention_under_interpreter():
    run_child(__file__)


@pytest.fixture
def triton_backend():
    only_in_child()
    from server.model.attention.triton_paged import TritonPagedAttention

    return TritonPagedAttention


HEADS, KV_HEADS, HEAD_DIM, BLOCK = 4, 2, 16, 4


def _pair(triton_cls, num_blocks=96, head_dim=HEAD_DIM):
    """A torch and a Triton backend over identical random caches."""
    geometry = ModelGeometry(1, KV_HEADS, head_dim, 4096, 100, HEADS)
    ref = TorchPagedAttention(geometry, num_blocks, BLOCK, torch.float32, "cpu")
    fast = triton_cls(geometry, num_blocks, BLOCK, torch.float32, "cpu")
    g = torch.Generator().manual_seed(7)
    ref.kv_caches[0].copy_(torch.randn(ref.kv_caches[0].shape, generator=g))
    fast.kv_caches[0].copy_(ref.kv_caches[0])
    return ref, fast


def _spans(lengths: list[tuple[int, int]], first_block: int = 1) -> list[SeqSpan]:
    """(cached prefix, new tokens) per sequence -> spans on disjoint, shuffled-looking block runs."""
    spans, row, block = [], 0, first_block
    for prefix, new in lengths:
        ctx = prefix + new
        blocks = -(-ctx // BLOCK)
        table = list(range(block + blocks - 1, block - 1, -1))  # descending: order comes from the table
        spans.append(SeqSpan(row, new, ctx, table))
        row, block = row + new, block + blocks
    return spans


def _step(
    backends, spans, *, static=False, scaling=None, window=None, softcap=None, head_dim=HEAD_DIM, width=0
):
    tokens = sum(s.num_tokens for s in spans)
    g = torch.Generator().manual_seed(len(spans) + tokens)
    q = torch.randn(1, tokens, HEADS, head_dim, generator=g).transpose(1, 2)  # HF's strided layout
    k = torch.randn(1, tokens, KV_HEADS, head_dim, generator=g).transpose(1, 2)
    v = torch.randn(1, tokens, KV_HEADS, head_dim, generator=g).transpose(1, 2)
    outs = []
    for backend in backends:
        backend.plan(StepLayout.from_spans(spans, BLOCK, "cpu", static=static, max_blocks=width))
        outs.append(backend.forward(0, q, k, v, scaling, window, softcap))
    return outs


PREFILL_CASES = {  # (cached prefix, new tokens) per sequence
    "fresh prompts, partial last blocks": [(0, 5), (0, 9), (0, 4)],
    "chunks after a cached prefix": [(3, 6), (8, 8), (0, 1)],
    "mixed with decode rows": [(0, 7), (10, 1), (5, 1), (2, 13)],
}


@pytest.mark.parametrize("case", sorted(PREFILL_CASES))
def test_prefill_matches_torch(triton_backend, case):
    ref, fast = _pair(triton_backend)
    want, got = _step((ref, fast), _spans(PREFILL_CASES[case]))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fast.kv_caches[0], ref.kv_caches[0])  # same slots written


def test_decode_matches_torch_across_splits(triton_backend):
    """Contexts from one token to beyond one split (256), GQA, one query row each."""
    ref, fast = _pair(triton_backend, num_blocks=260)
    spans = _spans([(0, 1), (6, 1), (299, 1), (255, 1), (256, 1)])
    want, got = _step((ref, fast), spans)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fast.kv_caches[0], ref.kv_caches[0])


@pytest.mark.parametrize("decode", [True, False])
def test_window_softcap_and_scale_match_torch(triton_backend, decode):
    ref, fast = _pair(triton_backend, num_blocks=120)
    lengths = [(40, 1), (290, 1), (3, 1)] if decode else [(9, 7), (0, 12), (20, 1)]
    want, got = _step((ref, fast), _spans(lengths), scaling=0.3, window=6, softcap=2.5)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_non_power_of_two_head_dim(triton_backend):
    ref, fast = _pair(triton_backend, head_dim=24)
    want, got = _step((ref, fast), _spans([(5, 1), (0, 6)]), head_dim=24)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_static_plan_is_bit_identical_to_eager(triton_backend):
    """A padded graph step sizes its launch from the block-table width; real rows must not change."""
    _, eager = _pair(triton_backend, num_blocks=200)
    _, static = _pair(triton_backend, num_blocks=200)
    spans = _spans([(12, 1), (280, 1), (0, 1)])
    a = _step((eager,), spans)[0]
    b = _step((static,), spans, static=True, width=190)[0]  # 760 tokens: 3 splits, 2 of them empty
    assert static.num_splits > eager.num_splits  # the static launch really is larger
    assert torch.equal(a, b)


def test_engine_with_triton_attention_matches_transformers(tmp_path):
    """The whole path (step buffers, plan, store, prefill, decode) on the tiny model, chunked prefill
    and staggered joins included, against transformers' own greedy generate."""
    only_in_child()
    from server.engine.sequence import Sequence
    from tests.engine_utils import build_engine, greedy, random_prompts, reference_greedy, run_staggered
    from tests.model_factory import make_tiny_model

    model_dir = make_tiny_model(tmp_path / "tiny", "llama")
    prompts = random_prompts([5, 23, 2, 14])
    want = reference_greedy(model_dir, prompts, 6)
    engine = build_engine(model_dir, attention_backend="triton", enable_lora=False, block_size=4,
                          num_kv_blocks=64, max_num_batched_tokens=16, max_num_seqs=4, device="cpu")  # fmt: skip
    assert engine.core.runner.attention.name == "triton"
    seqs = [Sequence(f"r{i}", p, greedy(6)) for i, p in enumerate(prompts)]
    got = run_staggered(engine.core, seqs, join_every=2)
    assert [got[s.request_id] for s in seqs] == want


def test_static_decode_with_triton_lora_matches_eager(tmp_path):
    """Triton attention and Triton LoRA in static (graph-bucket) mode: the launches a CUDA graph would
    replay, run eagerly, give the tokens of unpadded eager steps; a DoRA slot turns replay off."""
    only_in_child()
    from server.engine.sequence import Sequence
    from tests.engine_utils import (
        CountingReplay,
        build_test_runtime,
        greedy,
        random_prompts,
        run_staggered,
        with_decode_replay,
    )
    from tests.lora_fixtures import ALL_LINEAR, make_peft_adapter
    from tests.model_factory import make_tiny_model

    model_dir = make_tiny_model(tmp_path / "tiny", "llama")
    store = tmp_path / "store"
    for i in range(2):
        make_peft_adapter(model_dir, store / f"a{i}", r=8, target_modules=ALL_LINEAR, seed=i)
    make_peft_adapter(model_dir, store / "dora", r=4, target_modules=ALL_LINEAR, use_dora=True, seed=5)

    def run(names, replay):
        rt = build_test_runtime(model_dir, adapter_store=store, attention_backend="triton", lora_backend="triton",
                                max_loras=3, max_num_seqs=4, num_kv_blocks=48, block_size=4, device="cpu")  # fmt: skip
        rt.lora.manager.activate({n for n in names if n})  # resident from the first step (no prefetch race)
        if replay is not None:
            with_decode_replay(rt.engine, replay)
        prompts = random_prompts([4, 9, 6], seed=2)
        seqs = [Sequence(f"r{i}", p, greedy(5), rt.adapters.resolve(n) if n else None)
                for i, (n, p) in enumerate(zip(names, prompts, strict=True))]  # fmt: skip
        out = run_staggered(rt.engine.core, seqs)
        rt.close()
        return out

    names = ["a0", None, "a1"]
    replay = CountingReplay(needs_static_backends=True)
    assert run(names, replay) == run(names, None)
    assert replay.runs
    with_dora = CountingReplay(needs_static_backends=True)
    assert run(["a0", "dora", None], with_dora) == run(["a0", "dora", None], None)
    assert not with_dora.runs  # DoRA's host-side pass cannot be replayed: eager steps instead
