"""A request's life inside the engine: its tokens, KV blocks and progress."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from enum import Enum, auto

from server.engine.types import AdapterRef, FinishReason, SamplingParams


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


_counter = itertools.count()


class Sequence:
    """One generation request.

    ``num_computed_tokens`` counts tokens whose K/V are in the cache. Each step the scheduler gives a
    sequence ``num_new_tokens`` more (a prefill chunk, or 1 for decode); a token is sampled only when
    the step reaches the end of ``token_ids``. Preemption sets ``num_computed_tokens`` back to 0 and
    the prompt *plus* generated tokens are recomputed, so outputs are unchanged.
    """

    def __init__(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        adapter: AdapterRef | None = None,
        on_output: Callable | None = None,
    ) -> None:
        self.request_id = request_id
        self.seq_index = next(_counter)  # arrival order, the scheduler's priority
        self.token_ids: list[int] = list(prompt_ids)
        self.num_prompt_tokens = len(prompt_ids)
        self.params = params
        self.adapter = adapter or AdapterRef()
        self.on_output = on_output
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        self.num_computed_tokens = 0
        self.num_new_tokens = 0  # scheduled for the current step
        self.lora_slot = -1  # device slot of the adapter for the current step
        self.finish_reason: FinishReason | None = None
        self.error: str | None = None
        self.error_status: int | None = None
        self.arrival_time = time.monotonic()
        self.logprobs: list[float] = []
        self.generator = None  # torch.Generator for seeded sampling, made lazily by the sampler
        self.detokenizer = None  # set by the engine

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def adapter_key(self) -> str | None:
        return self.adapter.key

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    @property
    def will_sample(self) -> bool:
        """True when this step's chunk reaches the last known token, so its logits are needed."""
        return self.num_computed_tokens + self.num_new_tokens == len(self.token_ids)

    def num_blocks_needed(self, num_tokens: int, block_size: int) -> int:
        return (num_tokens + block_size - 1) // block_size

    def reset_for_recompute(self) -> None:
        self.num_computed_tokens = 0
        self.block_table = []
        self.status = SequenceStatus.WAITING
