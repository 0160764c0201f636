"""A short real load run against the real server, every response checked against transformers + PEFT.

Zipf traffic over four PEFT adapters (different ranks and target modules) plus the base model, with
fewer device slots than adapters so slot swapping happens mid-run; greedy decoding with ignore_eos, so
each request's expected text is PEFT's greedy continuation of its prompt, computed offline afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict

import pytest
import torch
from peft import PeftModel
from transformers import AutoTokenizer

from clients import AsyncLoraplexClient
from clients.loadgen import (
    ArrivalSpec,
    LengthSpec,
    PopularitySpec,
    RunConfig,
    WorkloadSpec,
    generate_schedule,
    run_load,
)
from clients.loadgen.prompts import PromptFactory
from server.config import Settings
from tests.api_harness import LiveServer
from tests.lora_fixtures import ALL_LINEAR, ATTENTION, load_base, make_peft_adapter

ADAPTERS = {
    "lg-attn-r4": dict(r=4, target_modules=ATTENTION, seed=21),
    "lg-all-r8": dict(r=8, target_modules=ALL_LINEAR, seed=22),
    "lg-qv-r16": dict(r=16, target_modules=["q_proj", "v_proj"], seed=23),
    "lg-mlp-r8-rslora": dict(
        r=8, target_modules=["gate_proj", "up_proj", "down_proj"], use_rslora=True, seed=24
    ),
}


@pytest.fixture(scope="module")
def adapter_dirs(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("loadgen_loras")
    return {name: make_peft_adapter(tiny_llama_dir, root / name, **kw) for name, kw in ADAPTERS.items()}


def _greedy(model, ids: list[int], n: int) -> list[int]:
    """Plain argmax decoding for exactly ``n`` tokens, EOS included: ignore_eos in vLLM's sense (the
    server keeps going past EOS), which ``generate(min_new_tokens=...)`` would instead mask out."""
    seq = list(ids)
    for _ in range(n):
        seq.append(int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(ids) :]


@torch.inference_mode()
def _peft_greedy(base_dir, adapter_dirs, jobs: dict[str | None, list[tuple[list[int], int]]]) -> dict:
    """(adapter, prompt ids, n) -> PEFT's greedy continuation ids, one prompt at a time."""
    model = load_base(base_dir)
    names = [n for n in jobs if n is not None]
    if names:
        model = PeftModel.from_pretrained(model, adapter_dirs[names[0]], adapter_name=names[0])
        for name in names[1:]:
            model.load_adapter(adapter_dirs[name], adapter_name=name)
        model.eval()
    out = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: a second intra-op thread only spins (30x slower on a busy box)
    try:
        for name, items in jobs.items():
            if name is None:
                ctx = model.disable_adapter() if names else contextlib.nullcontext()
            else:
                model.set_adapter(name)
                ctx = contextlib.nullcontext()
            with ctx:
                for ids, n in items:
                    out[(name, tuple(ids), n)] = _greedy(model, ids, n)
    finally:
        torch.set_num_threads(threads)
    return out


def test_short_load_run_has_no_errors_and_every_answer_matches_peft(tiny_llama_dir, adapter_dirs, tmp_path):
    settings = Settings(
        model=tiny_llama_dir,
        device="cpu",
        adapter_store=tmp_path / "store",
        num_kv_blocks=256,
        max_num_seqs=8,
        max_loras=2,  # < 4 adapters: the run must swap adapters in and out of device slots
        max_queue_len=256,
    )
    names = tuple(ADAPTERS)
    spec = WorkloadSpec(
        ArrivalSpec(12.0, "gamma", cv=2.0),
        PopularitySpec(names, "zipf", alpha=1.0, base_fraction=0.15),
        input_len=LengthSpec.parse("uniform:3:24"),
        output_len=LengthSpec.parse("uniform:4:12"),
        num_requests=36,
        duration_s=4.0,
        seed=7,
    )
    prompts = PromptFactory(seed=7)

    async def go(url):
        async with AsyncLoraplexClient(url) as client:
            for name in names:
                await client.upload_adapter(adapter_dirs[name], name)
            config = RunConfig(await client.base_model(), concurrency=16, drain_timeout_s=60.0)
            return await run_load(client, spec, config, prompts, progress=False, metrics_interval_s=0.5)

    with LiveServer(settings) as srv:
        result = asyncio.run(go(srv.url))

    report = result.report
    assert report.requests >= 20 and report.errors == {} and report.ok == report.requests, report.table()
    used = {r.adapter for r in result.records}
    assert None in used and len(used - {None}) >= 3  # base plus most adapters, with only 2 slots
    assert report.request_throughput > 0 and report.ttft.p99 >= report.ttft.p50 > 0
    assert report.itl.count > 0
    timeline = result.adapter_timeline  # sampled from the server's /metrics during the run
    assert len(timeline) >= 3 and timeline[0].start >= 0
    # The uploads were parsed (loaded) before the run; during it, 4 adapters rotate through 2 slots.
    assert sum(p.activations_per_s * (p.end - p.start) for p in timeline) >= 3
    assert any(0 <= p.slot_hit_rate <= 1 for p in timeline)

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    schedule = {p.index: p for p in generate_schedule(spec)}
    jobs: dict[str | None, list[tuple[list[int], int]]] = defaultdict(list)
    for rec in result.records:
        ids = tok.encode(rec.prompt)  # the same call the server makes
        assert rec.prompt_tokens == len(ids)
        assert rec.output_tokens == schedule[rec.index].output_len
        jobs[rec.adapter].append((ids, rec.output_tokens))
    expected = _peft_greedy(tiny_llama_dir, adapter_dirs, jobs)
    mismatches = []
    for rec in result.records:
        ids = tok.encode(rec.prompt)
        want = tok.decode(expected[(rec.adapter, tuple(ids), rec.output_tokens)], skip_special_tokens=True)
        if rec.text != want:
            mismatches.append((rec.index, rec.adapter, rec.text, want))
    assert not mismatches, mismatches
