"""The compiled CPU decode (``compile_decode``): the same greedy tokens as the eager engine, base and
mixed LoRA, every bucket; DoRA slots keep steps off the compiled graph. Behind ``-m compile``: the
compile itself takes a minute or more on the development machine's 2 cores."""

from __future__ import annotations

import pytest
import torch

from server.engine.sequence import Sequence
from tests.engine_utils import build_test_runtime, greedy, random_prompts, run_staggered
from tests.lora_fixtures import ALL_LINEAR, make_peft_adapter

pytestmark = pytest.mark.compile
NEW = 6


@pytest.fixture(scope="module")
def store(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("compile_store")
    make_peft_adapter(tiny_llama_dir, root / "a", r=8, target_modules=ALL_LINEAR, seed=1)
    make_peft_adapter(
        tiny_llama_dir, root / "b", r=16, target_modules=["q_proj", "v_proj", "down_proj"], seed=2
    )
    make_peft_adapter(
        tiny_llama_dir, root / "dora", r=4, target_modules=["q_proj", "v_proj"], use_dora=True, seed=3
    )
    return root


def _tokens(rt, names):
    prompts = random_prompts([5, 9, 3, 7, 11, 4, 6], seed=3)
    seqs = [
        Sequence(
            f"r{i}",
            p,
            greedy(NEW),
            rt.adapters.resolve(names[i % len(names)]) if names[i % len(names)] else None,
        )
        for i, p in enumerate(prompts)
    ]
    return run_staggered(rt.engine.core, seqs, join_every=2)


@pytest.mark.parametrize(
    "names", [[None], [None, "a", "b"], ["a", "dora", None]], ids=["base", "mixed", "dora"]
)
def test_compiled_decode_matches_eager(tiny_llama_dir, store, names):
    kw = dict(adapter_store=store, max_num_seqs=8, max_loras=4)
    eager = build_test_runtime(tiny_llama_dir, enforce_eager=True, **kw)
    compiled = build_test_runtime(tiny_llama_dir, compile_decode=True, **kw)
    graphs = compiled.engine.core.runner.graphs
    assert graphs is not None and graphs.active and sorted(graphs.replays) == [1, 2, 4, 8]
    assert _tokens(compiled, names) == _tokens(eager, names)
    if "dora" in names:  # a DoRA slot is resident: decode steps ran eagerly, unpadded
        assert not compiled.lora.manager.graph_safe()


def test_enforce_eager_skips_the_compile(tiny_llama_dir):
    rt = build_test_runtime(tiny_llama_dir, compile_decode=True, enforce_eager=True, enable_lora=False)
    assert rt.engine.core.runner.graphs is None
    assert torch.compiler.is_compiling() is False
