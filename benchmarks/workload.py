"""The benchmark workload and where it runs: a Llama-shaped random model, fixed prompts, timers."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from server.model.synthetic import char_tokenizer, make_random_model, model_config


@dataclass
class Workload:
    num_requests: int = 32
    prompt_len: int = 64
    new_tokens: int = 64

    def prompts(self, vocab: int, seed: int = 0) -> list[list[int]]:
        g = torch.Generator().manual_seed(seed)
        return torch.randint(3, vocab, (self.num_requests, self.prompt_len), generator=g).tolist()


@dataclass(frozen=True)
class Target:
    """The device and dtype every system in one run is measured on."""

    device: torch.device
    dtype: torch.dtype

    @classmethod
    def parse(cls, device: str, dtype: str) -> Target:
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if dtype == "auto":
            dtype = "bfloat16" if device.startswith("cuda") else "float32"
        return cls(torch.device(device), getattr(torch, dtype))

    def settings(self) -> dict:
        """The same choice as ``Settings`` fields."""
        return {"device": str(self.device), "dtype": str(self.dtype).removeprefix("torch.")}

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def make_bench_model(out_dir: Path, shape: str = "bench") -> Path:
    """The ~55M-parameter Llama (hidden 512, 8 layers, GQA 8/2, vocab 32000), random init, with a
    one-character-per-token tokenizer: prompts are token ids, and the same ids as text (a server
    benchmark) or in llama.cpp's GGUF conversion."""
    if (out_dir / "model.safetensors").exists():
        return out_dir
    config = model_config("llama", shape)
    return make_random_model(out_dir, config, char_tokenizer(config.vocab_size), seed=0)


def timed(fn, target: Target) -> tuple[float, object]:
    """Wall time of ``fn()``, with the device synchronized before and after (CUDA runs async)."""
    target.sync()
    start = time.perf_counter()
    result = fn()
    target.sync()
    return time.perf_counter() - start, result
