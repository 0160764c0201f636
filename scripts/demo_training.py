"""Deterministic little training loop shared by the demo model and demo adapter scripts.

Determinism comes from: one seed for torch, a dedicated ``torch.Generator`` for data order, a fixed
thread count (CPU reductions depend on it) and ``torch.use_deterministic_algorithms``. Text is packed
into one token stream and cut into fixed windows, so every step costs the same and the loss printed
at step N is the same on every re-run on the same machine.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class TrainConfig:
    steps: int
    batch_size: int
    seq_len: int
    lr: float
    warmup: int = 20
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    bf16: bool = False
    log_every: int = 10
    seed: int = 0


@dataclass(frozen=True)
class TrainResult:
    final_loss: float
    eval_loss: float
    seconds: float
    tokens: int


def make_deterministic(seed: int, threads: int = 2) -> None:
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)


def pack_windows(docs: list[list[int]], seq_len: int) -> torch.Tensor:
    """Concatenate token documents and cut them into ``[n, seq_len + 1]`` windows (inputs plus the
    shifted target); the ragged tail is dropped."""
    stream = torch.tensor([t for doc in docs for t in doc], dtype=torch.long)
    n = len(stream) // (seq_len + 1)
    if n == 0:
        raise ValueError(f"corpus of {len(stream)} tokens is shorter than one window of {seq_len + 1}")
    return stream[: n * (seq_len + 1)].view(n, seq_len + 1)


def split_eval(windows: torch.Tensor, fraction: float, generator: torch.Generator):
    order = torch.randperm(len(windows), generator=generator)
    n_eval = max(1, int(len(windows) * fraction))
    return windows[order[n_eval:]], windows[order[:n_eval]]


def batches(windows: torch.Tensor, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless epochs, each a fresh permutation; the last partial batch of an epoch is dropped."""
    if len(windows) < batch_size:
        raise ValueError(f"{len(windows)} windows cannot fill a batch of {batch_size}")
    while True:
        order = torch.randperm(len(windows), generator=generator)
        for i in range(0, len(order) - batch_size + 1, batch_size):
            yield windows[order[i : i + batch_size]]


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to ``min_lr_ratio * lr``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _loss(model: nn.Module, batch: torch.Tensor, bf16: bool) -> torch.Tensor:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = model(input_ids=batch[:, :-1]).logits
    return nn.functional.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())


@torch.no_grad()
def evaluate(model: nn.Module, windows: torch.Tensor, cfg: TrainConfig) -> float:
    model.eval()
    losses = [
        _loss(model, windows[i : i + cfg.batch_size], cfg.bf16)
        for i in range(0, len(windows), cfg.batch_size)
    ]
    model.train()
    return float(torch.stack(losses).mean())


def train(model: nn.Module, windows: torch.Tensor, cfg: TrainConfig, label: str) -> TrainResult:
    """AdamW over the parameters that require grad; prints loss, learning rate and throughput."""
    generator = torch.Generator().manual_seed(cfg.seed)
    train_windows, eval_windows = split_eval(windows, 0.02, generator)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )
    print(
        f"[{label}] {len(train_windows)} train / {len(eval_windows)} eval windows of {cfg.seq_len} tokens, "
        f"{sum(p.numel() for p in params):,} trainable params, {cfg.steps} steps of {cfg.batch_size}",
        flush=True,
    )
    model.train()
    start, running = time.perf_counter(), None
    data = batches(train_windows, cfg.batch_size, generator)
    for step in range(cfg.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        loss = _loss(model, next(data), cfg.bf16)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        value = loss.item()
        running = value if running is None else 0.9 * running + 0.1 * value
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            elapsed = time.perf_counter() - start
            tok_s = (step + 1) * cfg.batch_size * cfg.seq_len / elapsed
            print(
                f"[{label}] step {step + 1:4d}/{cfg.steps}  loss {value:.3f}  avg {running:.3f}  "
                f"lr {lr_at(step, cfg):.2e}  {tok_s:,.0f} tok/s  {elapsed:.0f}s",
                flush=True,
            )
    seconds = time.perf_counter() - start
    eval_loss = evaluate(model, eval_windows, cfg)
    print(f"[{label}] done in {seconds:.0f}s, eval loss {eval_loss:.3f}", flush=True)
    model.eval()
    return TrainResult(running, eval_loss, seconds, cfg.steps * cfg.batch_size * cfg.seq_len)


@torch.no_grad()
def continuations(
    model, tokenizer, prompts: list[str], max_new_tokens: int = 40, sample: bool = False
) -> list[str]:
    """Greedy (or seeded top-p) continuations, for eyeballing what a model has learned."""
    out = []
    for i, prompt in enumerate(prompts):
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        kwargs = {"do_sample": True, "temperature": 0.8, "top_p": 0.95} if sample else {"do_sample": False}
        torch.manual_seed(i)
        gen = model.generate(
            ids, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, **kwargs
        )
        out.append(tokenizer.decode(gen[0, ids.shape[1] :], skip_special_tokens=True))
    return out
