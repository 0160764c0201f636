"""Vectorised sampling with per-row parameters.

Sampling uses the exponential-race trick, ``argmax(probs / E)`` with ``E ~ Exponential(1)``, which
draws from ``probs`` without a CDF search. A request with a ``seed`` draws its noise from its own
generator, so its output does not depend on which other requests share the batch.
"""

from __future__ import annotations

import torch

from server.engine.sequence import Sequence


class Sampler:
    def __init__(self, device: str, seed: int = 0) -> None:
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list[float] | None]:
        """logits [B, V] float32 for ``seqs`` -> (token ids, logprobs of them if any row wants them)."""
        greedy = torch.tensor([s.params.greedy for s in seqs], device=logits.device)
        tokens = logits.argmax(dim=-1)
        if not bool(greedy.all()):
            sampled = self._sample(logits, seqs)
            tokens = torch.where(greedy, tokens, sampled)
        logprobs = None
        if any(s.params.logprobs for s in seqs):
            logprobs = torch.log_softmax(logits, dim=-1).gather(1, tokens[:, None])[:, 0].tolist()
        return tokens.tolist(), logprobs

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        temps = torch.tensor([s.params.temperature or 1.0 for s in seqs], device=logits.device)
        logits = logits / temps[:, None]
        top_k = [s.params.top_k for s in seqs]
        top_p = [s.params.top_p for s in seqs]
        if any(k > 0 for k in top_k) or any(p < 1.0 for p in top_p):
            logits = self._apply_top_k_top_p(logits, top_k, top_p)
        probs = torch.softmax(logits, dim=-1)
        noise = torch.empty_like(probs)
        noise.exponential_(generator=self.generator)
        for row, seq in enumerate(seqs):
            if seq.params.seed is not None and not seq.params.greedy:
                if seq.generator is None:
                    seq.generator = torch.Generator(device=logits.device).manual_seed(seq.params.seed)
                noise[row].exponential_(generator=seq.generator)
        return (probs / noise).argmax(dim=-1)

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
