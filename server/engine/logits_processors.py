"""What a request's parameters do to its logits before sampling, for a whole step's batch at once.

Each processor touches only the rows that asked for it and works on [rows, vocab] tensors: the
per-row inputs (biases, output-token counts, seen-token masks) are gathered into padded tensors once
per step, never applied one row at a time.
"""

from __future__ import annotations

import torch

from server.engine.sequence import Sequence
from server.engine.structured import apply_grammars


def process_logits(logits: torch.Tensor, seqs: list[Sequence], eos_token_ids: frozenset[int]) -> None:
    """In place, in vLLM's order: grammar mask, ``min_tokens``, ``logit_bias``, penalties."""
    apply_grammars(logits, seqs)
    apply_min_tokens(logits, seqs, eos_token_ids)
    apply_logit_bias(logits, seqs)
    apply_penalties(logits, seqs)


def _index(pairs: list[tuple[int, int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = zip(*pairs, strict=True)
    return torch.tensor(rows, device=device), torch.tensor(cols, device=device)


def apply_min_tokens(logits: torch.Tensor, seqs: list[Sequence], eos_token_ids: frozenset[int]) -> None:
    """EOS and the request's stop token ids cannot be sampled before ``min_tokens`` outputs."""
    pairs = [
        (row, token)
        for row, seq in enumerate(seqs)
        if seq.num_output_tokens < seq.params.min_tokens
        for token in (*eos_token_ids, *seq.params.stop_token_ids)
    ]
    if pairs:
        logits[_index(pairs, logits.device)] = float("-inf")


def apply_logit_bias(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    """OpenAI's ``logit_bias``: each listed token's logit moves by its bias."""
    pairs, values = [], []
    for row, seq in enumerate(seqs):
        for token, bias in seq.params.logit_bias.items():
            pairs.append((row, token))
            values.append(bias)
    if pairs:
        bias = torch.tensor(values, dtype=logits.dtype, device=logits.device)
        logits.index_put_(_index(pairs, logits.device), bias, accumulate=True)


def _padded(ids: list[list[int]], pad: int, device) -> torch.Tensor:
    width = max(1, max(len(x) for x in ids))
    return torch.tensor([x + [pad] * (width - len(x)) for x in ids], dtype=torch.long, device=device)


def output_token_counts(seqs: list[Sequence], vocab: int, device) -> torch.Tensor:
    """[rows, vocab] how often each token is in each row's output so far (float)."""
    out_ids = _padded([s.token_ids[s.num_prompt_tokens :] for s in seqs], vocab, device)
    counts = torch.zeros(len(seqs), vocab + 1, device=device)
    counts.scatter_add_(1, out_ids, torch.ones_like(out_ids, dtype=counts.dtype))
    return counts[:, :vocab]


def prompt_token_mask(seqs: list[Sequence], vocab: int, device) -> torch.Tensor:
    """[rows, vocab] True where the token is in the row's prompt."""
    ids = _padded([s.token_ids[: s.num_prompt_tokens] for s in seqs], vocab, device)
    mask = torch.zeros(len(seqs), vocab + 1, dtype=torch.bool, device=device)
    return mask.scatter_(1, ids, True)[:, :vocab]


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    """vLLM's (and OpenAI's) penalties on the rows that set any.

    ``repetition_penalty`` r (prompt and output tokens): positive logits / r, negative ones * r;
    then ``logit -= frequency_penalty * count + presence_penalty * (count > 0)`` over output tokens.
    """
    rows = [i for i, s in enumerate(seqs) if s.params.has_penalties]
    if not rows:
        return
    device, vocab = logits.device, logits.shape[-1]
    chosen = [seqs[i] for i in rows]
    index = torch.tensor(rows, device=device)

    def per_row(name: str) -> torch.Tensor:
        return torch.tensor([getattr(s.params, name) for s in chosen], device=device)[:, None]

    sub = logits[index]
    counts = output_token_counts(chosen, vocab, device)
    in_output = counts > 0
    if any(s.params.repetition_penalty != 1.0 for s in chosen):
        repetition = per_row("repetition_penalty")
        seen = in_output | prompt_token_mask(chosen, vocab, device)
        sub = torch.where(seen, torch.where(sub > 0, sub / repetition, sub * repetition), sub)
    sub = sub - per_row("frequency_penalty") * counts - per_row("presence_penalty") * in_output
    logits[index] = sub
