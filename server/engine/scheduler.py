"""Continuous (iteration-level) batching.

Every step, running sequences go first (so decodes are never starved by long prompts), then
waiting ones are admitted while the token budget, the sequence cap, free KV blocks and the adapter
slots allow, in the order ``admission.py`` gives (arrival order, adapter-aware when slots are
short). A new sequence starts on the longest cached prefix of its blocks (prefix caching) and only
the rest is computed; one whose next block a running sequence is computing waits for it, and a step
that completes a prefix others wait on takes no more new prefill work (``PrefixWait``). Prompts are
chunked to fit the budget, so prefill and decode share steps; a step that decodes running sequences
takes at most ``prefill_while_decoding`` prompt tokens (``StepBudget``), so a burst of new prompts
costs each running stream a few bounded waits rather than one whole-budget prefill step.
When KV blocks run out, the most recently arrived running sequence is preempted and later
recomputed: memory pressure slows requests down instead of failing them. Each step first hands the
waiting requests' adapters to the slots for prefetching (host memory, and free device slots filled
off the engine thread; a request whose slot is being filled joins a later step).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from server.engine.adapter_slots import AdapterSlots
from server.engine.admission import LPM_MAX_WAITING, AdmissionOrder
from server.engine.block_manager import BlockManager
from server.engine.sequence import Sequence, SequenceStatus
from server.engine.types import FinishReason


@dataclass
class StepBudget:
    """Tokens one step may still schedule, and how many of them may be prompt (prefill) work. A step
    that decodes running sequences caps its prompt tokens: on CPU a 2,048-token prefill step takes
    ~0.2 s, and every running stream would wait that long for its next token (inter-token latency p99
    of a burst); with the cap the prompts are chunked over a few shorter steps instead."""

    tokens: int
    prompt: int

    @classmethod
    def for_step(cls, tokens: int, prefill_while_decoding: int | None, running: list[Sequence]) -> StepBudget:
        decoding = any(len(s) - s.num_computed_tokens == 1 for s in running)
        return cls(
            tokens, min(tokens, prefill_while_decoding) if decoding and prefill_while_decoding else tokens
        )

    def allows(self, remaining: int) -> int:
        """How many of a sequence's ``remaining`` tokens fit (more than one: prompt work)."""
        return min(remaining, self.tokens) if remaining <= 1 else min(remaining, self.tokens, self.prompt)

    def spend(self, num_new: int) -> None:
        self.tokens -= num_new
        if num_new > 1:
            self.prompt -= num_new


@dataclass
class SchedulerOutput:
    scheduled: list[Sequence] = field(default_factory=list)
    failed: list[Sequence] = field(default_factory=list)  # adapters that could not be loaded
    num_preempted: int = 0

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


def cached_prefix(blocks: BlockManager, slots: AdapterSlots | None, seq: Sequence) -> list[int]:
    """The cached blocks waiting ``seq`` can start on, under the weights its adapter serves now."""
    identity = slots.cache_identity(seq.adapter) if seq.adapter is not None and slots is not None else None
    return blocks.cached_prefix(seq, identity)


class PrefixWait:
    """One admission pass's rules for prompts that share a prefix nobody has cached yet.

    - A waiting request whose next uncached block a running request is computing waits for it to
      be published instead of computing the same prefix a second time beside it (SGLang's in-batch
      prefix check): in a burst on a new system prompt, the first request computes it once.
    - Finish-prefix-first: once a request admitted in this pass completes its prompt in this step
      and others wait on its blocks, the step takes no more new prefill work (requests with most of
      their prompt cached, and starving ones, still join). The step ends sooner, so those followers
      - short jobs, a user turn each - get their first token a step of long prefills earlier.
    """

    def __init__(self, running: list[Sequence], waiting: deque[Sequence], blocks: BlockManager) -> None:
        self.enabled = blocks.cache is not None
        self.block_size = blocks.block_size
        self.waiting = waiting
        self.inflight = {h for s in running for h in s.block_hashes[s.num_registered_blocks :]}
        self.short_step = False

    def defers(self, seq: Sequence, num_cached: int, starving: bool) -> bool:
        """Whether ``seq`` (``num_cached`` of its blocks cached) waits for a later step."""
        if not self.enabled or len(seq.block_hashes) <= num_cached:
            return False
        if seq.block_hashes[num_cached] in self.inflight:
            return True
        mostly_cached = 2 * num_cached * self.block_size >= len(seq)
        return self.short_step and not (mostly_cached or starving)

    def admitted(self, seq: Sequence, num_cached: int, completes: bool) -> None:
        if not self.enabled:
            return
        own = seq.block_hashes[num_cached:]
        self.inflight.update(own)
        if completes and own and self._has_followers(seq, num_cached):
            self.short_step = True

    def _has_followers(self, seq: Sequence, index: int) -> bool:
        """Whether another waiting request shares ``seq``'s block ``index`` (and so every one before);
        not looked for in a long queue (hashes are computed for all only while LPM orders it)."""
        if len(self.waiting) > LPM_MAX_WAITING:
            return False
        h = seq.block_hashes[index]
        return any(
            s is not seq and len(s.block_hashes) > index and s.block_hashes[index] == h for s in self.waiting
        )


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        slots: AdapterSlots | None,
        admission: AdmissionOrder,
        clock: Callable[[], float] = time.monotonic,
        prefill_while_decoding: int | None = None,  # None: prompts may take the whole step budget
    ) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.prefill_while_decoding = prefill_while_decoding
        self.slots = slots
        self.admission = admission
        self.clock = clock
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0  # lifetime count, for metrics and tests

    # --- queue ------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        seq.arrival_time = self.clock()
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def find(self, request_id: str) -> Sequence | None:
        return next((s for s in (*self.running, *self.waiting) if s.request_id == request_id), None)

    # --- one step ---------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = StepBudget.for_step(self.max_num_batched_tokens, self.prefill_while_decoding, self.running)
        if self.slots is not None:
            for identity in self.slots.stale_cache_identities():
                self.block_manager.drop(identity)
            self.slots.prefetch(self.admission.prefetch_order(self.waiting, self.clock()))
        for seq in self.running:
            seq.num_new_tokens = 0
        self._schedule_running(out, budget)
        if out.num_preempted == 0:
            self._admit_waiting(out, budget)
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: StepBudget) -> None:
        queue = list(self.running)
        self.running = []
        while queue:
            seq = queue.pop(0)
            num_new = budget.allows(len(seq) - seq.num_computed_tokens)
            if num_new <= 0:
                self.running.append(seq)
                continue
            target = seq.num_computed_tokens + num_new
            while not self.block_manager.can_allocate(seq, target) and queue:
                self._preempt(queue.pop())
                out.num_preempted += 1
            if not self.block_manager.can_allocate(seq, target):
                self._preempt(seq)
                out.num_preempted += 1
                continue
            self.block_manager.allocate(seq, target)
            seq.num_new_tokens = num_new
            budget.spend(num_new)
            out.scheduled.append(seq)
            self.running.append(seq)

    def _admit_waiting(self, out: SchedulerOutput, budget: StepBudget) -> None:
        active = {s.adapter_key for s in self.running if s.adapter_key}
        now = self.clock()
        blocks = self.block_manager
        cached = (lambda s: len(cached_prefix(blocks, self.slots, s))) if blocks.cache is not None else None
        draining = None  # an adapter admitted nothing this step, so that its slot frees for a starving one
        blocked: set[str] = set()  # adapters still loading or not fitting: the same for the rest of this pass
        prefixes = PrefixWait(self.running, self.waiting, blocks)
        for seq in self.admission.order(self.waiting, self.slots, active, now, cached):
            if budget.tokens <= 0 or budget.prompt <= 0 or len(self.running) >= self.max_num_seqs:
                break
            key = seq.adapter_key
            if key and self.slots is not None:
                if key == draining or key in blocked:
                    continue
                state = self.slots.readiness(seq.adapter)
                if state == "error":
                    self.waiting.remove(seq)
                    out.failed.append(seq)
                    continue
                if state != "ready" or (key not in active and not self.slots.fits(active | {key})):
                    if state == "ready" and draining is None and self.admission.is_starving(seq, now):
                        draining = self.admission.drain_victim(self.running)
                    blocked.add(key)  # loading, or slots are short: asked again next step
                    continue  # others go ahead: loads run off the critical path, resident adapters first
            prefix = cached_prefix(blocks, self.slots, seq)
            if prefixes.defers(seq, len(prefix), self.admission.is_starving(seq, now)):
                continue
            num_new = budget.allows(len(seq) - len(prefix) * blocks.block_size)
            total = len(prefix) * blocks.block_size + num_new
            if not blocks.can_admit(seq, prefix, total):
                break
            blocks.admit(seq, prefix, total)
            self.waiting.remove(seq)
            seq.status = SequenceStatus.RUNNING
            seq.num_new_tokens = num_new
            budget.spend(num_new)
            if key and self.slots is not None:
                self.slots.pin(key)
                active.add(key)
            self.running.append(seq)
            out.scheduled.append(seq)
            prefixes.admitted(seq, len(prefix), total >= len(seq))

    def _preempt(self, seq: Sequence) -> None:
        self.num_preemptions += 1
        self.block_manager.free(seq)
        seq.reset_for_recompute()
        seq.num_new_tokens = 0
        if seq.adapter_key and self.slots is not None:
            self.slots.unpin(seq.adapter_key)
        self.waiting.appendleft(seq)

    # --- after the step ---------------------------------------------------------------------
    def postprocess(self, out: SchedulerOutput, sampled: dict[int, int]) -> None:
        """Advance computed counts and append sampled tokens (keyed by ``id(seq)``)."""
        for seq in out.scheduled:
            seq.num_computed_tokens += seq.num_new_tokens
            self.block_manager.publish(seq)
            token = sampled.get(id(seq))
            if token is not None:
                seq.token_ids.append(token)
            seq.num_new_tokens = 0

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Ends ``seq`` wherever it is and frees its blocks at once."""
        if seq.is_finished:
            return
        was_running = seq.status == SequenceStatus.RUNNING
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        if was_running and seq.adapter_key and self.slots is not None:
            self.slots.unpin(seq.adapter_key)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
