"""Vectorised sampling with per-row parameters.

Greedy rows take the largest logit (``argmax_rows``: a native kernel on CPU); sampled rows draw by
inverse CDF, one uniform per row (see ``_sample``). A request with a ``seed`` draws its noise from its own
generator, so its output does not depend on which other requests share the batch. Before that,
``process_logits`` applies each row's grammar, ``min_tokens``, ``logit_bias`` and penalties to the
whole batch; logprobs (and the top alternatives) come from the same logits pass, before processing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from server.engine.greedy import argmax_rows, native_argmax_usable
from server.engine.logits_processors import process_logits
from server.engine.sequence import Sequence
from server.engine.types import TopLogprobs


@dataclass
class SamplerOutput:
    tokens: list[int]
    logprobs: list[float] | None = None  # per row, when any row asked
    top_logprobs: list[TopLogprobs] | None = None  # per row (empty where the row asked none)


class Sampler:
    def __init__(self, device: str, seed: int = 0, eos_token_ids: frozenset[int] = frozenset()) -> None:
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.eos_token_ids = eos_token_ids
        if self.device.type == "cpu":
            native_argmax_usable()  # built (first start on a machine) or loaded now, not on a request

    @torch.inference_mode()  # the runner's logits are inference tensors, processed here in place
    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> SamplerOutput:
        """logits [B, V] float32 for ``seqs`` -> the sampled tokens (and logprobs where asked)."""
        raw = torch.log_softmax(logits, dim=-1) if any(s.params.logprobs for s in seqs) else None
        process_logits(logits, seqs, self.eos_token_ids)
        greedy = torch.tensor([s.params.greedy for s in seqs], device=logits.device)
        tokens = argmax_rows(logits)
        if not bool(greedy.all()):
            sampled = self._sample(logits, seqs)
            tokens = torch.where(greedy, tokens, sampled)
        if raw is None:
            return SamplerOutput(tokens.tolist())
        top_k = [s.params.top_logprobs if s.params.logprobs else 0 for s in seqs]
        return SamplerOutput(tokens.tolist(), *token_logprobs(raw, tokens, top_k))

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        temps = torch.tensor([s.params.temperature or 1.0 for s in seqs], device=logits.device)
        logits = logits / temps[:, None]
        min_p = [s.params.min_p for s in seqs]
        if any(min_p):
            logits = self._apply_min_p(logits, min_p)
        top_k = [s.params.top_k for s in seqs]
        top_p = [s.params.top_p for s in seqs]
        if any(k > 0 for k in top_k) or any(p < 1.0 for p in top_p):
            logits = self._apply_top_k_top_p(logits, top_k, top_p)
        # Inverse-CDF sampling: one uniform draw per row. (The exponential-race trick draws one per
        # vocabulary entry; on a CPU that RNG was a fifth of a 64-row decode step at vocab 32000.)
        cdf = torch.softmax(logits, dim=-1).cumsum(dim=-1)
        draws = torch.rand(len(seqs), 1, generator=self.generator, device=logits.device)
        for row, seq in enumerate(seqs):
            if seq.params.seed is not None and not seq.params.greedy:
                if seq.generator is None:
                    seq.generator = torch.Generator(device=logits.device).manual_seed(seq.params.seed)
                draws[row] = torch.rand(1, generator=seq.generator, device=logits.device)
        # right=True: the first token whose cumulative probability exceeds the draw, so tokens of zero
        # probability (masked, cut by top-k/top-p/min-p) are never chosen.
        picked = torch.searchsorted(cdf, draws * cdf[:, -1:], right=True)
        return picked.squeeze(1).clamp_(max=logits.shape[-1] - 1)

    @staticmethod
    def _apply_min_p(logits: torch.Tensor, min_p: list[float]) -> torch.Tensor:
        """Drops tokens whose probability is below ``min_p`` times the row's most likely token's."""
        probs = torch.softmax(logits, dim=-1)
        floor = torch.tensor(min_p, device=logits.device)[:, None] * probs.max(dim=-1, keepdim=True).values
        return logits.masked_fill(probs < floor, float("-inf"))

    @staticmethod
    def _apply_top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
        vocab = logits.shape[-1]
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        ranks = torch.arange(vocab, device=logits.device)[None, :]
        k = torch.tensor([k if k > 0 else vocab for k in top_k], device=logits.device)
        remove = ranks >= k[:, None]
        p = torch.tensor(top_p, device=logits.device)
        sorted_probs = torch.softmax(sorted_logits.masked_fill(remove, float("-inf")), dim=-1)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        remove |= mass_before >= p[:, None]  # keeps the smallest prefix reaching top_p (>= 1 token)
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
        return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def token_logprobs(
    logprobs: torch.Tensor, tokens: torch.Tensor, top_k: list[int]
) -> tuple[list[float], list[TopLogprobs]]:
    """Each row's logprob of its ``tokens`` entry and its ``top_k[row]`` most likely (id, logprob).

    ``logprobs`` [rows, V] log-softmaxed; one ``topk`` for the largest k, cut per row.
    """
    chosen = logprobs.gather(1, tokens[:, None])[:, 0].tolist()
    k_max = max(top_k, default=0)
    if k_max == 0:
        return chosen, [[] for _ in top_k]
    values, ids = logprobs.topk(k_max, dim=-1)
    values, ids = values.tolist(), ids.tolist()
    top = [list(zip(ids[r][:k], values[r][:k], strict=True)) for r, k in enumerate(top_k)]
    return chosen, top


@torch.inference_mode()
def score_prompts(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    """Appends the prompt logprobs of this step's chunks to the sequences that asked for them.

    ``logits`` holds one row per ``seq.prompt_logprob_positions()`` position, in ``seqs`` order
    (``ModelRunner.prompt_logprob_rows``); the row at position p scores prompt token p + 1.
    """
    row = 0
    for seq in seqs:
        positions = seq.prompt_logprob_positions()
        if not positions:
            continue
        chunk = torch.log_softmax(logits[row : row + len(positions)], dim=-1)
        targets = torch.tensor(seq.token_ids[positions.start + 1 : positions.stop + 1], device=logits.device)
        chosen, top = token_logprobs(chunk, targets, [seq.params.top_logprobs] * len(positions))
        seq.prompt_logprobs += chosen
        seq.prompt_top_logprobs += top
        row += len(positions)
