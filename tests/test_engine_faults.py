"""One bad step never takes the server down (issue 14, point 4), through the engine's fault seam.

A step that raises - at any of its points, a generic error or a device out-of-memory - fails exactly
the requests in it with the right kind, frees their KV blocks and adapter pins, is counted, and the
requests around it still produce PEFT's tokens. A step that hangs past ``engine_step_timeout_s`` makes
``/health`` and ``/ready`` fail until it ends.
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
import torch

from server.config import Settings
from server.engine.faults import FaultPoint
from server.engine.sequence import Sequence
from server.engine.types import ErrorKind, FinishReason
from tests.api_harness import LiveServer, greedy_ids, peft_model, token_ids_of
from tests.engine_utils import build_test_runtime, greedy
from tests.fault_injection import InjectedFaults, first_token_is
from tests.lora_fixtures import make_peft_adapter

POISON = 13
NEW = 6
PROMPTS = {"a": [3, 4, 5, 6], "b": [7, 8, 9], "base": [10, 11, 12, 14, 15]}


@pytest.fixture(scope="module")
def env(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    store = root / "store"
    make_peft_adapter(tiny_llama_dir, store / "a", r=4, seed=21)
    make_peft_adapter(tiny_llama_dir, store / "b", r=8, seed=22, target_modules=["q_proj", "down_proj"])
    oracle = {
        name: greedy_ids(peft_model(tiny_llama_dir, {name: store / name} if name != "base" else None), p, NEW)
        for name, p in PROMPTS.items()
    }
    return dict(model=tiny_llama_dir, store=store, oracle=oracle, root=root)


def _seq(rt, rid: str, adapter: str, prompt: list[int]) -> Sequence:
    ref = rt.adapters.resolve(adapter) if adapter != "base" else None
    return Sequence(rid, prompt, greedy(NEW), ref)


def _drive(core, seqs: list[Sequence]) -> dict[str, list]:
    for seq in seqs:
        core.add(seq)
    outputs: dict[str, list] = {s.request_id: [] for s in seqs}
    while core.has_work():
        for seq, out in core.step():
            outputs[seq.request_id].append(out)
    return outputs


@pytest.mark.parametrize("point", list(FaultPoint))
@pytest.mark.parametrize(
    "exc, kind",
    [
        (RuntimeError("injected kernel error"), ErrorKind.INTERNAL),
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), ErrorKind.OUT_OF_MEMORY),
    ],
    ids=["internal", "oom"],
)
def test_a_failing_step_fails_only_its_requests_and_frees_everything(env, point, exc, kind):
    rt = build_test_runtime(env["model"], adapter_store=env["store"], max_loras=2, max_num_seqs=2,
                            num_kv_blocks=64, block_size=4)  # fmt: skip
    core, manager = rt.engine.core, rt.lora.manager
    faults = InjectedFaults().raise_at(point, exc, when=first_token_is(POISON))
    core.faults = faults
    # before: both adapters load and serve; then the poisoned step holds "poison" (adapter b) and
    # "peer" (adapter a); "waiter" queues behind them (max_num_seqs=2); "after" comes once all is over.
    before = _drive(core, [_seq(rt, "before", "a", PROMPTS["a"]), _seq(rt, "before-b", "b", PROMPTS["b"])])
    poisoned = [
        _seq(rt, "poison", "b", [POISON, *PROMPTS["b"]]),
        _seq(rt, "peer", "a", PROMPTS["a"]),
        _seq(rt, "waiter", "base", PROMPTS["base"]),
    ]
    during = _drive(core, poisoned)
    after = _drive(core, [_seq(rt, "after-b", "b", PROMPTS["b"]), _seq(rt, "after-a", "a", PROMPTS["a"])])

    assert len(faults.fired) == 1 and sorted(faults.fired[0][1]) == ["peer", "poison"]
    for rid in ("poison", "peer"):
        last = during[rid][-1]
        assert last.finished and last.finish_reason == FinishReason.ERROR and last.error_kind == kind
        assert ("out of device memory" in last.error) == (kind is ErrorKind.OUT_OF_MEMORY)
    for outputs, rid, adapter in [
        (before, "before", "a"),
        (before, "before-b", "b"),
        (during, "waiter", "base"),
        (after, "after-a", "a"),
        (after, "after-b", "b"),
    ]:
        ids = [t for out in outputs[rid] for t in out.new_token_ids]
        assert outputs[rid][-1].finish_reason == FinishReason.LENGTH and outputs[rid][-1].error is None
        assert ids == env["oracle"][adapter], rid
    assert core.block_manager.num_free_blocks == core.block_manager.num_blocks
    assert manager._slots.pinned() == set()  # noqa: SLF001 - the pins are what is checked
    assert core.stats().failed_steps == {kind.value: 1}


def _settings(env, **overrides) -> Settings:
    base = dict(model=env["model"], served_model_name="tiny", adapter_store=env["store"], device="cpu",
                num_kv_blocks=128, export_dir=env["root"] / "exports")  # fmt: skip
    return Settings(**{**base, **overrides})


def _body(model: str, prompt: list[int], **extra) -> dict:
    body = dict(model=model, prompt=prompt, max_tokens=NEW, temperature=0, ignore_eos=True, logprobs=0)
    return {**body, "return_tokens_as_token_ids": True, **extra}


def test_out_of_memory_is_503_counted_and_others_keep_their_outputs(env):
    with LiveServer(_settings(env)) as srv:
        oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        faults = InjectedFaults().raise_at(FaultPoint.FORWARD, oom, when=first_token_is(POISON), times=2)
        srv.engine.core.faults = faults
        r = httpx.post(f"{srv.url}/v1/completions", json=_body("b", [POISON, 1, 2]), timeout=30)
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        error = r.json()["error"]
        assert error["type"] == "service_unavailable" and "out of device memory" in error["message"]
        # Streaming, failing after the first token went out: an error event, then [DONE].
        faults.raise_at(FaultPoint.SAMPLED, RuntimeError("NaN guard tripped"),
                        when=lambda seqs: any(s.num_output_tokens == 2 for s in seqs))  # fmt: skip
        with httpx.stream("POST", f"{srv.url}/v1/completions", json=_body("a", PROMPTS["a"], stream=True),
                          timeout=30) as s:  # fmt: skip
            lines = [line for line in s.iter_lines() if line]
        assert s.status_code == 200 and lines[-1] == "data: [DONE]"
        assert "NaN guard tripped" in json.loads(lines[-2][6:])["error"]["message"]
        for name in ("a", "b", "base"):
            ok = httpx.post(f"{srv.url}/v1/completions", json=_body(name if name != "base" else "tiny",
                            PROMPTS[name]), timeout=30)  # fmt: skip
            assert ok.status_code == 200, ok.text
            assert token_ids_of(ok.json()["choices"][0]["logprobs"]) == env["oracle"][name]
        metrics = httpx.get(f"{srv.url}/metrics").text
        assert 'loraplex_engine_step_failures_total{kind="out_of_memory"} 1.0' in metrics
        assert 'loraplex_engine_step_failures_total{kind="internal"} 1.0' in metrics
        assert httpx.get(f"{srv.url}/health").status_code == 200


def test_a_hung_step_fails_health_and_readiness_until_it_ends(env):
    with LiveServer(_settings(env, engine_step_timeout_s=0.5)) as srv:
        release = threading.Event()
        srv.engine.core.faults = InjectedFaults().hang_at(FaultPoint.FORWARD, release, first_token_is(POISON))
        result: dict = {}
        worker = threading.Thread(target=lambda: result.update(
            r=httpx.post(f"{srv.url}/v1/completions", json=_body("tiny", [POISON, 2, 3]), timeout=60)))  # fmt: skip
        worker.start()
        try:
            assert httpx.get(f"{srv.url}/health").status_code == 200  # not yet over the limit
            start = time.monotonic()
            while httpx.get(f"{srv.url}/health").status_code == 200:
                assert time.monotonic() - start < 10, "the hung step was never reported"
                time.sleep(0.05)
            health = httpx.get(f"{srv.url}/health")
            assert (
                health.status_code == 503 and "engine_step_timeout_s=0.5" in health.json()["error"]["message"]
            )
            assert httpx.get(f"{srv.url}/ready").status_code == 503
        finally:
            release.set()
            worker.join(timeout=30)
        assert result["r"].status_code == 200  # a slow step is not a failed one
        assert httpx.get(f"{srv.url}/health").status_code == 200
        assert httpx.get(f"{srv.url}/ready").status_code == 200


def test_out_of_memory_is_recognised_however_the_library_raises_it():
    from server.engine.llm_engine import classify_step_error

    for exc in (
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError("CUDA error: out of memory"),
        RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
    ):
        assert classify_step_error(exc)[0] is ErrorKind.OUT_OF_MEMORY, exc
    for exc in (RuntimeError("shape mismatch"), ValueError("out of memory"), KeyError("x")):
        assert classify_step_error(exc)[0] is ErrorKind.INTERNAL, exc
