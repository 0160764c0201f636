"""The comparison baseline (scripts/baseline_server.py) speaks the same API and gives PEFT's answers.

Otherwise the throughput ratio in compare_baseline.py would compare servers doing different work.
"""

from __future__ import annotations

import asyncio
import importlib.util
from pathlib import Path

import httpx
import pytest
import torch
from transformers import AutoTokenizer

from clients import AsyncLoraplexClient, NotFoundError
from clients.loadgen import ArrivalSpec, LengthSpec, PopularitySpec, RunConfig, WorkloadSpec, run_load
from tests.lora_fixtures import load_base, make_peft_adapter

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "baseline_server.py"


def _baseline_module():
    spec = importlib.util.spec_from_file_location("baseline_server", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_baseline_server_matches_peft_and_survives_a_load_run(tiny_llama_dir, tmp_path):
    from peft import PeftModel

    adapter = make_peft_adapter(tiny_llama_dir, tmp_path / "b-one", r=8, seed=31)
    baseline = _baseline_module()
    app = baseline.create_app(baseline.BaselineModel(tiny_llama_dir))
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    prompt = "the adapter server"
    ids = tok.encode(prompt)

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with AsyncLoraplexClient("http://baseline", transport=transport) as c:
            await c.upload_adapter(adapter, "b-one")
            assert [m.id for m in await c.models()] == [tiny_llama_dir.name, "b-one"]
            whole = await c.complete(prompt, "b-one", max_tokens=10, temperature=0)
            parts = [ch async for ch in c.stream_complete(prompt, "b-one", max_tokens=10, temperature=0)]
            base = await c.complete(prompt, max_tokens=10, temperature=0)
            with pytest.raises(NotFoundError):
                await c.complete(prompt, "missing", max_tokens=2)
            spec = WorkloadSpec(ArrivalSpec(20.0), PopularitySpec(("b-one",), base_fraction=0.3),
                                LengthSpec.parse("uniform:3:10"), LengthSpec.parse("fixed:4"), num_requests=8)  # fmt: skip
            run = await run_load(c, spec, RunConfig(await c.base_model(), concurrency=8), progress=False)
            return whole, parts, base, run

    whole, parts, base, run = asyncio.run(go())
    assert "".join(p.text for p in parts) == whole.text and parts[-1].usage == whole.usage
    with torch.inference_mode():
        peft = PeftModel.from_pretrained(load_base(tiny_llama_dir), adapter).eval()
        want = peft.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False)[0, len(ids) :]
        with peft.disable_adapter():
            want_base = peft.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False)[0, len(ids) :]
    assert whole.text == tok.decode(want, skip_special_tokens=True)
    assert base.text == tok.decode(want_base, skip_special_tokens=True) != whole.text
    assert run.report.ok == run.report.requests == 8 and run.report.errors == {}
