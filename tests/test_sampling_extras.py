"""vLLM's sampling extras inside the batched engine, each against a plain per-request oracle:
penalties, logit_bias, min_tokens, min_p, top-k and prompt logprobs; rows that ask for none of them
share the batch unchanged."""

from __future__ import annotations

import pytest
import torch

from server.engine.sampler import Sampler
from server.engine.sequence import Sequence
from server.engine.types import FinishReason, SamplingParams
from tests.engine_utils import build_engine, greedy, random_prompts, run_staggered
from tests.lora_fixtures import load_base

NEW = 10


@pytest.fixture(scope="module")
def engine(tiny_llama_dir):
    # A small budget chunks the prefills, so prompt logprobs cross chunk boundaries.
    return build_engine(
        tiny_llama_dir, enable_lora=False, block_size=4, max_num_batched_tokens=24, max_num_seqs=8
    )


@pytest.fixture(scope="module")
def model(tiny_llama_dir):
    return load_base(tiny_llama_dir)


def penalised(logits: torch.Tensor, prompt: list[int], output: list[int], p: SamplingParams) -> torch.Tensor:
    """vLLM's penalties written out token by token (the oracle for the vectorised version)."""
    logits = logits.clone()
    for token in set(prompt) | set(output):
        value = logits[token]
        logits[token] = value / p.repetition_penalty if value > 0 else value * p.repetition_penalty
    for token in set(output):
        logits[token] -= p.frequency_penalty * output.count(token) + p.presence_penalty
    for token, bias in p.logit_bias.items():
        logits[token] += bias
    return logits


@torch.no_grad()
def reference(model, prompt: list[int], params: SamplingParams) -> list[int]:
    """Greedy decoding with a full forward per token and the penalties applied by hand."""
    output: list[int] = []
    for _ in range(params.max_tokens):
        logits = model(input_ids=torch.tensor([prompt + output])).logits[0, -1]
        output.append(int(penalised(logits, prompt, output, params).argmax()))
    return output


def _run(engine, jobs: list[tuple[list[int], SamplingParams]]) -> list[list[int]]:
    seqs = [Sequence(f"r{i}", prompt, params) for i, (prompt, params) in enumerate(jobs)]
    outs = run_staggered(engine.core, seqs, join_every=1)
    return [outs[s.request_id] for s in seqs]


PENALTIES = [
    dict(repetition_penalty=1.8),
    dict(repetition_penalty=0.6),
    dict(frequency_penalty=1.5),
    dict(presence_penalty=2.0),
    dict(frequency_penalty=-0.7, presence_penalty=0.9, repetition_penalty=1.3),
    dict(logit_bias={7: 3.0, 100: -5.0}),
]


def test_penalties_and_bias_match_the_oracle_in_one_mixed_batch(engine, model):
    prompts = random_prompts([6, 11, 4, 9, 7, 13, 5, 8], seed=21)
    jobs = [(prompts[i], greedy(NEW, **kw)) for i, kw in enumerate(PENALTIES)]
    jobs += [(prompts[6], greedy(NEW)), (prompts[7], greedy(NEW))]  # no extras: untouched
    outs = _run(engine, jobs)
    for (prompt, params), got in zip(jobs, outs, strict=True):
        assert got == reference(model, prompt, params), params
    plain = [_run(engine, [(p, greedy(NEW))])[0] for p, _ in jobs[: len(PENALTIES)]]
    assert sum(a != b for a, b in zip(outs, plain, strict=False)) >= len(PENALTIES) - 1  # they act


def test_logit_bias_forces_and_forbids_tokens(engine):
    prompt = random_prompts([8], seed=5)[0]
    (plain,) = _run(engine, [(prompt, greedy(NEW))])
    (forced,) = _run(engine, [(prompt, greedy(NEW, logit_bias={42: 100.0}))])
    assert forced == [42] * NEW
    (banned,) = _run(engine, [(prompt, greedy(NEW, logit_bias={plain[0]: -100.0}))])
    assert banned[0] != plain[0]


def test_min_tokens_holds_back_eos_and_stop_token_ids(engine):
    eos = next(iter(engine.core.limits.eos_token_ids))
    prompt = random_prompts([6], seed=8)[0]
    eager = dict(max_tokens=12, temperature=0.0, logit_bias={eos: 100.0})
    (now,) = _run(engine, [(prompt, SamplingParams(**eager))])
    assert now == [eos]
    seqs = [Sequence("m", prompt, SamplingParams(min_tokens=5, **eager))]
    seqs.append(Sequence("s", prompt, SamplingParams(max_tokens=12, temperature=0.0, min_tokens=3,
                                                     stop_token_ids=[55], logit_bias={55: 100.0})))  # fmt: skip
    outs = run_staggered(engine.core, seqs, join_every=1)
    assert len(outs["m"]) == 6 and outs["m"][-1] == eos and eos not in outs["m"][:5]
    assert outs["s"][-1] == 55 and len(outs["s"]) == 4
    assert all(s.finish_reason == FinishReason.STOP for s in seqs)


def test_min_p_one_is_greedy_and_min_p_cuts_the_tail():
    sampler = Sampler("cpu", seed=3)
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    seqs = [Sequence(f"r{i}", [1], SamplingParams(temperature=1.0, min_p=0.5)) for i in range(400)]
    seqs += [Sequence("g", [1], SamplingParams(temperature=1.0, min_p=1.0))]
    logits = probs.log().repeat(len(seqs), 1)
    tokens = sampler(logits.clone(), seqs).tokens
    assert set(tokens[:-1]) == {0, 1}  # 0.15 and 0.05 are below 0.5 * 0.5
    assert tokens[-1] == 0
    free = [Sequence(f"f{i}", [1], SamplingParams(temperature=1.0)) for i in range(400)]
    assert set(sampler(probs.log().repeat(400, 1), free).tokens) == {0, 1, 2, 3}


def test_sampling_follows_the_distribution_and_never_picks_a_masked_token():
    """Inverse-CDF sampling (one draw per row): frequencies within 4 standard errors of the
    probabilities over 20,000 rows; a masked (-inf) token, even between likely ones, never comes up;
    a seeded row repeats."""
    sampler = Sampler("cpu", seed=5)
    probs = torch.tensor([0.1, 0.0, 0.6, 0.25, 0.0, 0.05])
    n = 20_000
    seqs = [Sequence(f"r{i}", [1], SamplingParams(temperature=1.0)) for i in range(n)]
    tokens = torch.tensor(sampler(probs.log().repeat(n, 1), seqs).tokens)
    freq = torch.bincount(tokens, minlength=len(probs)).float() / n
    assert freq[1] == 0 and freq[4] == 0
    assert torch.all((freq - probs).abs() <= 4 * (probs * (1 - probs) / n).sqrt() + 1e-9), freq
    seeded = [Sequence(f"s{i}", [1], SamplingParams(temperature=1.0, seed=7)) for i in range(2)]
    again = [Sequence(f"t{i}", [1], SamplingParams(temperature=1.0, seed=7)) for i in range(2)]
    logits = torch.randn(2, 50)
    assert sampler(logits.clone(), seeded).tokens == sampler(logits.clone(), again).tokens


@torch.no_grad()
def test_top_logprobs_and_prompt_logprobs_match_transformers(engine, model):
    prompt = random_prompts([30], seed=13)[0]  # longer than the 24-token budget: chunked prefill
    params = greedy(6, logprobs=True, top_logprobs=5, prompt_logprobs=True)
    seq = Sequence("lp", prompt, params)
    run_staggered(engine.core, [seq, Sequence("other", random_prompts([9])[0], greedy(6))])
    full = seq.token_ids
    want = torch.log_softmax(model(input_ids=torch.tensor([full])).logits[0], dim=-1)
    for i, pos in enumerate(range(len(prompt) - 1, len(full) - 1)):  # output token i is scored at pos
        assert seq.logprobs[i] == pytest.approx(want[pos, full[pos + 1]].item(), abs=1e-4)
        values, ids = want[pos].topk(5)
        assert [t for t, _ in seq.top_logprobs[i]] == ids.tolist()
        assert [v for _, v in seq.top_logprobs[i]] == pytest.approx(values.tolist(), abs=1e-4)
    assert len(seq.prompt_logprobs) == len(prompt) - 1
    for pos in range(len(prompt) - 1):
        assert seq.prompt_logprobs[pos] == pytest.approx(want[pos, prompt[pos + 1]].item(), abs=1e-4)
        assert [t for t, _ in seq.prompt_top_logprobs[pos]] == want[pos].topk(5).indices.tolist()


def test_prompt_logprobs_survive_preemption(tiny_llama_dir):
    ae = build_engine(tiny_llama_dir, enable_lora=False, block_size=4, num_kv_blocks=14,
                      max_num_batched_tokens=16, max_num_seqs=4)  # fmt: skip
    prompts = random_prompts([20, 18, 22], seed=4)
    seqs = [
        Sequence(f"r{i}", p, greedy(8, logprobs=True, prompt_logprobs=True)) for i, p in enumerate(prompts)
    ]
    run_staggered(ae.core, seqs, join_every=1)
    assert ae.core.scheduler.num_preemptions > 0
    alone = build_engine(tiny_llama_dir, enable_lora=False)
    for prompt, seq in zip(prompts, seqs, strict=True):
        ref = Sequence("ref", prompt, greedy(8, logprobs=True, prompt_logprobs=True))
        run_staggered(alone.core, [ref])
        assert seq.prompt_logprobs == pytest.approx(ref.prompt_logprobs, abs=1e-4)
        assert seq.token_ids == ref.token_ids


def test_bitmask_penalty_reads_bit_j_of_word_i_as_token_32i_plus_j():
    from server.engine.structured import bitmask_penalty

    vocab = 100
    bitmask = torch.randint(
        -(2**31), 2**31 - 1, (3, 4), dtype=torch.int32, generator=torch.Generator().manual_seed(1)
    )
    penalty = bitmask_penalty(bitmask, vocab, torch.float32)
    assert penalty.shape == (3, vocab)
    for row in range(3):
        for token in range(vocab):
            allowed = (int(bitmask[row, token // 32]) >> (token % 32)) & 1
            assert penalty[row, token].item() == (0.0 if allowed else float("-inf"))
