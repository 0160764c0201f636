"""The synchronous engine core: schedule -> activate adapters -> run model -> sample -> postprocess.

Only the engine thread calls ``step``; everything here is single-threaded by design, so no locks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from server.engine.adapter_slots import AdapterSlots
from server.engine.block_manager import BlockManager
from server.engine.detokenizer import IncrementalDetokenizer
from server.engine.faults import NO_FAULTS, FaultPoint, StepFaults
from server.engine.model_runner import ModelRunner
from server.engine.sampler import Sampler, SamplerOutput, score_prompts
from server.engine.scheduler import Scheduler, SchedulerOutput
from server.engine.sequence import Sequence
from server.engine.types import EngineStats, ErrorKind, FinishReason, RequestOutput

log = logging.getLogger(__name__)
IDLE_WAIT_S = 0.005  # the longest a step with nothing runnable blocks on adapter loads


@dataclass
class EngineLimits:
    max_model_len: int
    eos_token_ids: frozenset[int]


@dataclass
class StepCounters:
    """Lifetime totals for metrics."""

    steps: int = 0
    last_batch_size: int = 0
    scheduled_seqs: int = 0
    batched_tokens: int = 0
    failed_steps: dict[str, int] = field(default_factory=dict)  # ErrorKind value -> count

    def record(self, out: SchedulerOutput) -> None:
        self.steps += 1
        self.last_batch_size = len(out.scheduled)
        self.scheduled_seqs += len(out.scheduled)
        self.batched_tokens += out.num_tokens

    def record_failure(self, kind: ErrorKind) -> None:
        self.failed_steps[kind.value] = self.failed_steps.get(kind.value, 0) + 1


def classify_step_error(exc: Exception) -> tuple[ErrorKind, str]:
    """What a step's exception means for its requests: device out of memory (503, retry) - the
    allocator's ``torch.OutOfMemoryError``, or a library's "out of memory" RuntimeError (cuBLAS,
    a kernel launch) - or internal (500). The one place OOM is recognised."""
    message = str(exc).lower()
    if isinstance(exc, torch.OutOfMemoryError) or (
        type(exc) is RuntimeError and ("out of memory" in message or "cublas_status_alloc_failed" in message)
    ):
        first_line = (str(exc).splitlines() or [""])[0]
        return ErrorKind.OUT_OF_MEMORY, f"out of device memory in the engine step, retry later ({first_line})"
    return ErrorKind.INTERNAL, f"internal error in engine step: {exc}"


def release_cached_device_memory() -> None:
    """After an out-of-memory step, hand the allocator's cached blocks back so the next step can fit."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class LLMEngine:
    def __init__(
        self,
        runner: ModelRunner,
        scheduler: Scheduler,
        sampler: Sampler,
        tokenizer,
        limits: EngineLimits,
        slots: AdapterSlots | None = None,  # None: base-model serving only
    ) -> None:
        self.runner = runner
        self.scheduler = scheduler
        self.sampler = sampler
        self.tokenizer = tokenizer
        self.limits = limits
        self.slots = slots
        self.counters = StepCounters()
        self.faults: StepFaults = NO_FAULTS  # tests inject failures here: see server/engine/faults.py

    @property
    def block_manager(self) -> BlockManager:
        return self.scheduler.block_manager

    # --- requests ---------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        seq.detokenizer = IncrementalDetokenizer(self.tokenizer, seq.token_ids, seq.params.stop)
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> RequestOutput | None:
        seq = self.scheduler.find(request_id)
        if seq is None:
            return None
        self.scheduler.finish(seq, FinishReason.ABORT)
        return request_output(seq, [])

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    # --- one iteration ----------------------------------------------------------------------
    def step(self) -> list[tuple[Sequence, RequestOutput]]:
        out = self.scheduler.schedule()
        results = [
            (seq, self._fail(seq, self._adapter_error(seq), ErrorKind.ADAPTER_UNAVAILABLE))
            for seq in out.failed
        ]
        if not out.scheduled:
            if not results and self.slots is not None and self.scheduler.waiting:
                self.slots.idle_wait(IDLE_WAIT_S)  # every waiting request is on an adapter load
            return results
        try:
            self._run_batch(out, results)
        except Exception as exc:  # one bad step fails its own requests, the engine keeps serving
            kind, message = classify_step_error(exc)
            log.exception("engine step failed (%s); failing the %d requests in it", kind.value,
                          len(out.scheduled))  # fmt: skip
            self.counters.record_failure(kind)
            if kind is ErrorKind.OUT_OF_MEMORY:
                release_cached_device_memory()
            results += [(s, self._fail(s, message, kind)) for s in out.scheduled if not s.is_finished]
        return results

    def _run_batch(self, out: SchedulerOutput, results: list[tuple[Sequence, RequestOutput]]) -> None:
        """Activate -> forward -> sample -> postprocess; appends each sequence's output to ``results``."""
        self.faults.at(FaultPoint.ACTIVATE, out.scheduled)
        seqs = self._assign_slots(out)
        self.faults.at(FaultPoint.FORWARD, seqs)
        logits = self.runner.run(seqs)
        sampling = [s for s in seqs if s.will_sample]
        score_prompts(logits[len(sampling) :], seqs)
        sampled = self.sampler(logits[: len(sampling)], sampling) if sampling else SamplerOutput([])
        self.faults.at(FaultPoint.SAMPLED, sampling)
        self.counters.record(out)
        self.scheduler.postprocess(out, {id(s): t for s, t in zip(sampling, sampled.tokens, strict=True)})
        self.faults.at(FaultPoint.POSTPROCESS, sampling)
        for i, seq in enumerate(sampling):
            if seq.params.logprobs:
                seq.logprobs.append(sampled.logprobs[i])
                seq.top_logprobs.append(sampled.top_logprobs[i])
            results.append((seq, self._process_token(seq, sampled.tokens[i])))

    def _assign_slots(self, out: SchedulerOutput) -> list[Sequence]:
        """Activates the step's adapters and orders sequences by slot so LoRA segments are long."""
        seqs = out.scheduled
        if self.slots is None:
            return seqs
        keys = {s.adapter_key for s in seqs if s.adapter_key}
        slot_of = self.slots.activate(keys) if keys else {}
        for seq in seqs:
            seq.lora_slot = slot_of.get(seq.adapter_key, -1) if seq.adapter_key else -1
        return sorted(seqs, key=lambda s: s.lora_slot)

    def _adapter_error(self, seq: Sequence) -> str:
        detail = self.slots.load_error(seq.adapter) if self.slots is not None else None
        return f"adapter '{seq.adapter_key}' could not be loaded: {detail or 'unknown error'}"

    def _process_token(self, seq: Sequence, token: int) -> RequestOutput:
        params = seq.params
        reason = None
        may_stop = seq.num_output_tokens >= params.min_tokens
        stop_hit = seq.detokenizer.add_tokens([token], check_stop=may_stop)
        if seq.matcher is not None and not seq.matcher.accept(token):
            return self._fail(
                seq, f"token {token} was sampled outside the request's grammar", ErrorKind.INTERNAL
            )
        grammar_done = seq.matcher is not None and seq.matcher.is_finished()
        if (
            (not params.ignore_eos and token in self.limits.eos_token_ids)
            or token in params.stop_token_ids
            or stop_hit is not None
            or grammar_done
        ):
            reason = FinishReason.STOP
        elif seq.num_output_tokens >= params.max_tokens or len(seq) >= self.limits.max_model_len:
            reason = FinishReason.LENGTH
        if reason is not None:
            self.scheduler.finish(seq, reason)
        return request_output(seq, [token])

    def _fail(self, seq: Sequence, message: str, kind: ErrorKind) -> RequestOutput:
        seq.error, seq.error_kind = message, kind
        self.scheduler.finish(seq, FinishReason.ERROR)
        return request_output(seq, [])

    def stats(self) -> EngineStats:
        running, waiting, c = self.scheduler.running, self.scheduler.waiting, self.counters
        blocks = self.block_manager
        return EngineStats(
            num_waiting=len(waiting),
            num_running=len(running),
            kv_cache_usage=blocks.usage,
            kv_cache_cached_free=blocks.cached_free_usage,
            prefix_cache_queries=blocks.num_queried_tokens,
            prefix_cache_hits=blocks.num_hit_tokens,
            running_adapters=sorted({s.adapter_key for s in running if s.adapter_key}),
            waiting_adapters=sorted({s.adapter_key for s in waiting if s.adapter_key}),
            resident_adapters=self.slots.resident() if self.slots is not None else [],
            max_loras=self.slots.max_loras if self.slots is not None else 0,
            num_steps=c.steps,
            num_preemptions=self.scheduler.num_preemptions,
            last_batch_size=c.last_batch_size,
            num_scheduled_seqs_total=c.scheduled_seqs,
            num_batched_tokens_total=c.batched_tokens,
            failed_steps=dict(c.failed_steps),
        )


def request_output(seq: Sequence, new_ids: list[int]) -> RequestOutput:
    """The increment to send for ``seq`` after it gained ``new_ids`` (or ended)."""
    finished = seq.is_finished
    text = seq.detokenizer.flush(finished) if seq.detokenizer is not None else ""
    out = RequestOutput(
        request_id=seq.request_id,
        new_token_ids=new_ids,
        new_text=text,
        finished=finished,
        finish_reason=seq.finish_reason,
        num_prompt_tokens=seq.num_prompt_tokens,
        num_cached_tokens=seq.num_cached_tokens or 0,
        num_output_tokens=seq.num_output_tokens,
        error=seq.error,
        error_kind=seq.error_kind,
    )
    if seq.params.logprobs and new_ids:
        out.logprobs = seq.logprobs[-len(new_ids) :]
        out.top_logprobs = seq.top_logprobs[-len(new_ids) :]
    if seq.params.prompt_logprobs and seq.num_output_tokens == len(new_ids):  # the first increment
        out.prompt_logprobs, out.prompt_top_logprobs = seq.prompt_logprobs, seq.prompt_top_logprobs
    return out
