"""A request's life inside the engine: its tokens, KV blocks and progress."""

from __future__ import annotations

from collections.abc import Hashable
from enum import Enum, auto
from typing import TYPE_CHECKING

from server.engine.adapter_slots import AdapterHandle
from server.engine.types import ErrorKind, FinishReason, SamplingParams, TopLogprobs

if TYPE_CHECKING:
    import torch

    from server.engine.detokenizer import IncrementalDetokenizer
    from server.engine.structured import GrammarMatcher


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class Sequence:
    """One generation request.

    ``num_computed_tokens`` counts tokens whose K/V are in the cache. Each step the scheduler gives a
    sequence ``num_new_tokens`` more (a prefill chunk, or 1 for decode); a token is sampled only when
    the step reaches the end of ``token_ids``. Preemption sets ``num_computed_tokens`` back to 0 and
    the prompt *plus* generated tokens are recomputed, so outputs are unchanged.

    With prefix caching a sequence is admitted with ``num_computed_tokens`` already at the end of
    the longest cached chain of its full blocks (``block_hashes``, named under ``cache_identity``:
    the identity of the adapter weights it runs with, None for the base model).
    """

    def __init__(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        adapter: AdapterHandle | None = None,
    ) -> None:
        self.request_id = request_id
        self.token_ids: list[int] = list(prompt_ids)
        self.num_prompt_tokens = len(prompt_ids)
        self.params = params
        self.adapter = adapter  # None: the base model
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        self.num_computed_tokens = 0
        self.num_new_tokens = 0  # scheduled for the current step
        self.lora_slot = -1  # device slot of the adapter for the current step
        self.finish_reason: FinishReason | None = None
        self.error: str | None = None
        self.error_kind: ErrorKind | None = None
        self.logprobs: list[float] = []
        self.arrival_time = 0.0  # when it entered the waiting queue (scheduler clock)
        self.cache_identity: Hashable = None  # whose K/V its blocks hold; set at admission
        self.block_hashes: list[bytes] = []  # hash chain of its full blocks of token_ids
        self.num_registered_blocks = 0  # leading blocks of block_table published to the prefix cache
        self.num_cached_tokens: int | None = None  # prompt tokens reused at its first admission
        self.top_logprobs: list[TopLogprobs] = []
        self.prompt_logprobs: list[float] = []  # of prompt tokens 1.. (filled by prefill steps)
        self.prompt_top_logprobs: list[TopLogprobs] = []
        self.matcher: GrammarMatcher | None = params.grammar.matcher() if params.grammar else None
        self.generator: torch.Generator | None = None  # for seeded sampling, made by the sampler
        self.detokenizer: IncrementalDetokenizer | None = None  # set by the engine

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def adapter_key(self) -> str | None:
        return self.adapter.key if self.adapter is not None else None

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

    def prompt_logprob_positions(self) -> range:
        """Positions of this step's chunk whose logits score a prompt token not yet scored.

        The logits at position p score token p + 1; preemption recomputes the prompt, but each
        token is scored once.
        """
        if not self.params.prompt_logprobs:
            return range(0)
        start = max(self.num_computed_tokens, len(self.prompt_logprobs))
        return range(start, min(self.num_computed_tokens + self.num_new_tokens, self.num_prompt_tokens - 1))

    def reset_for_recompute(self) -> None:
        self.num_computed_tokens = 0
        self.block_table = []
        self.num_registered_blocks = 0
        self.status = SequenceStatus.WAITING
