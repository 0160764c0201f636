"""The engine against transformers' generate(): staggered continuous batches, chunked prefill,
preemption, sampling, stops, cancellation."""

from __future__ import annotations

import asyncio

import pytest
from transformers import AutoTokenizer

from server.engine.sequence import Sequence
from server.engine.types import FinishReason, SamplingParams
from tests.engine_utils import build_engine, greedy, random_prompts, reference_greedy, run_staggered

LENGTHS = [1, 5, 17, 33, 2, 60, 9, 48, 3, 25, 16, 70]
NEW_TOKENS = 14


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_staggered_batch_matches_generate(kind, tiny_llama_dir, tiny_qwen2_dir):
    model_dir = tiny_llama_dir if kind == "llama" else tiny_qwen2_dir
    prompts = random_prompts(LENGTHS)
    refs = reference_greedy(model_dir, prompts, NEW_TOKENS)
    # A small token budget forces chunked prefills that share steps with decodes.
    ae = build_engine(model_dir, enable_lora=False, block_size=4, max_num_batched_tokens=40, max_num_seqs=8)
    seqs = [Sequence(f"r{i}", p, greedy(NEW_TOKENS)) for i, p in enumerate(prompts)]
    outs = run_staggered(ae.core, seqs, join_every=2)
    for i, seq in enumerate(seqs):
        assert outs[seq.request_id] == refs[i], f"prompt {i} (len {len(prompts[i])}) diverged"
    assert ae.core.block_manager.num_free_blocks == ae.core.block_manager.num_blocks


def test_a_step_that_decodes_takes_at_most_its_prompt_cap(tiny_llama_dir):
    """Prompts arriving while others decode are chunked to ``max_prefill_tokens_while_decoding`` per
    step (the running streams' wait for a token stays bounded); outputs still match generate()."""
    prompts = random_prompts([40, 5, 33, 2, 48], seed=5)
    refs = reference_greedy(tiny_llama_dir, prompts, NEW_TOKENS)
    ae = build_engine(tiny_llama_dir, enable_lora=False, block_size=4, max_num_batched_tokens=64,
                      max_prefill_tokens_while_decoding=8)  # fmt: skip
    scheduler = ae.core.scheduler
    schedule, seen = scheduler.schedule, []

    def recording():
        decoding = [len(s) - s.num_computed_tokens == 1 for s in scheduler.running]
        out = schedule()
        prompt_tokens = sum(s.num_new_tokens for s in out.scheduled if s.num_new_tokens > 1)
        seen.append((any(decoding), prompt_tokens))
        return out

    scheduler.schedule = recording
    seqs = [Sequence(f"r{i}", p, greedy(NEW_TOKENS)) for i, p in enumerate(prompts)]
    outs = run_staggered(ae.core, seqs, join_every=1)
    assert [outs[s.request_id] for s in seqs] == refs
    assert all(tokens <= 8 for decoding, tokens in seen if decoding)
    assert any(tokens > 8 for decoding, tokens in seen if not decoding)  # alone, a prompt takes the budget


def test_step_budget_caps_prompt_tokens_only_while_something_decodes():
    from server.engine.scheduler import StepBudget

    decoding, prefilling = Sequence("d", [1, 2, 3], greedy(4)), Sequence("p", [1, 2, 3], greedy(4))
    decoding.num_computed_tokens = 2  # one token left: a decode
    budget = StepBudget.for_step(2048, 512, [prefilling, decoding])
    assert (budget.tokens, budget.prompt) == (2048, 512)
    assert budget.allows(64) == 64 and budget.allows(1000) == 512
    budget.spend(512)
    assert budget.allows(10) == 0 and budget.allows(1) == 1  # decodes still fit the step
    assert StepBudget.for_step(2048, 512, [prefilling]).prompt == 2048  # nothing decodes: no cap
    assert StepBudget.for_step(2048, None, [decoding]).prompt == 2048


def test_preemption_under_tiny_kv_budget_keeps_outputs(tiny_llama_dir):
    prompts = random_prompts([30, 22, 41, 12, 35, 27], seed=3)
    refs = reference_greedy(tiny_llama_dir, prompts, NEW_TOKENS)
    # 20 blocks of 4 = 80 tokens of KV for six requests that need ~230: preemption must happen.
    ae = build_engine(
        tiny_llama_dir, enable_lora=False, block_size=4, num_kv_blocks=20, max_num_batched_tokens=64
    )
    seqs = [Sequence(f"r{i}", p, greedy(NEW_TOKENS)) for i, p in enumerate(prompts)]
    outs = run_staggered(ae.core, seqs, join_every=1)
    assert ae.core.scheduler.num_preemptions > 0
    for i, seq in enumerate(seqs):
        assert outs[seq.request_id] == refs[i]
    assert ae.core.block_manager.num_free_blocks == 20


def _sample(ae, prompt, params, companions=()):
    seqs = [Sequence("target", prompt, params)]
    seqs += [
        Sequence(f"c{i}", p, SamplingParams(max_tokens=8, temperature=1.0)) for i, p in enumerate(companions)
    ]
    return run_staggered(ae.core, seqs, join_every=1)["target"]


def test_seeded_sampling_is_reproducible_across_batches(tiny_llama_dir):
    ae = build_engine(tiny_llama_dir, enable_lora=False)
    prompt = random_prompts([12])[0]
    params = dict(max_tokens=20, temperature=1.3, top_p=0.95, top_k=50, ignore_eos=True)
    alone = _sample(ae, prompt, SamplingParams(seed=7, **params))
    crowded = _sample(
        ae, prompt, SamplingParams(seed=7, **params), companions=random_prompts([5, 9, 3], seed=9)
    )
    other_seed = _sample(ae, prompt, SamplingParams(seed=8, **params))
    assert alone == crowded
    assert alone != other_seed
    assert len(alone) == 20


def test_top_k_one_and_tiny_top_p_equal_greedy(tiny_llama_dir):
    ae = build_engine(tiny_llama_dir, enable_lora=False)
    prompt = random_prompts([10])[0]
    ref = _sample(ae, prompt, greedy(10))
    assert (
        _sample(ae, prompt, SamplingParams(max_tokens=10, temperature=0.8, top_k=1, ignore_eos=True)) == ref
    )
    assert (
        _sample(ae, prompt, SamplingParams(max_tokens=10, temperature=0.8, top_p=1e-6, ignore_eos=True))
        == ref
    )


def _collect(ae, seq):
    ae.core.add(seq)
    text, ids, last = "", [], None
    while ae.core.has_work():
        for _, out in ae.core.step():
            text += out.new_text
            ids += out.new_token_ids
            last = out
    return text, ids, last


def test_stop_string_and_max_tokens(tiny_llama_dir):
    ae = build_engine(tiny_llama_dir, enable_lora=False)
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    prompt = random_prompts([8], seed=5)[0]
    full_text, full_ids, last = _collect(ae, Sequence("a", prompt, greedy(30)))
    assert last.finish_reason == FinishReason.LENGTH and len(full_ids) == 30
    assert full_text == tok.decode(full_ids, skip_special_tokens=True)
    stop = full_text[len(full_text) // 2 : len(full_text) // 2 + 3]
    expected = full_text[: full_text.find(stop)]
    text, ids, last = _collect(ae, Sequence("b", prompt, greedy(30, stop=[stop])))
    assert last.finish_reason == FinishReason.STOP
    assert text == expected
    assert len(ids) < 30
    _, ids, _ = _collect(ae, Sequence("c", prompt, greedy(30, stop_token_ids=[full_ids[4]])))
    assert ids == full_ids[: full_ids.index(full_ids[4]) + 1]


def test_eos_ends_generation(tiny_llama_dir):
    ae = build_engine(tiny_llama_dir, enable_lora=False)
    prompt = random_prompts([8], seed=5)[0]
    _, full_ids, _ = _collect(ae, Sequence("a", prompt, greedy(30)))
    ae.core.limits.eos_token_ids = frozenset({full_ids[3]})
    _, ids, last = _collect(ae, Sequence("b", prompt, SamplingParams(max_tokens=30, temperature=0)))
    assert last.finish_reason == FinishReason.STOP
    assert ids == full_ids[: full_ids.index(full_ids[3]) + 1]


def test_async_stream_and_cancellation_free_blocks(tiny_llama_dir):
    async def scenario():
        ae = build_engine(tiny_llama_dir, enable_lora=False, block_size=4)
        await ae.start()
        total = ae.core.block_manager.num_blocks
        prompt = random_prompts([20])[0]
        ref = reference_greedy(tiny_llama_dir, [prompt], 12)[0]
        ids = []
        async for out in await ae.add_request(prompt, greedy(12)):
            ids += out.new_token_ids
        assert ids == ref
        stream = await ae.add_request(prompt, greedy(400))
        async for out in stream:
            if out.num_output_tokens >= 3:
                break
        await stream.aclose()  # the client went away
        for _ in range(200):
            await asyncio.sleep(0.01)
            if ae.stats().num_running == 0 and ae.core.block_manager.num_free_blocks == total:
                break
        assert ae.core.block_manager.num_free_blocks == total
        assert ae.stats().num_running == 0
        await ae.shutdown()

    asyncio.run(scenario())


def test_validation_errors(tiny_llama_dir):
    from server.engine.types import InvalidRequestError

    async def scenario():
        ae = build_engine(tiny_llama_dir, enable_lora=False, max_model_len=64)
        with pytest.raises(InvalidRequestError, match="maximum context length is 64"):
            await ae.add_request([5] * 60, greedy(10))
        with pytest.raises(InvalidRequestError):
            await ae.add_request([], greedy(10))
        with pytest.raises(InvalidRequestError):
            await ae.add_request([100000], greedy(10))

    asyncio.run(scenario())
