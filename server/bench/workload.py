"""The benchmark workload: a Llama-shaped random model and fixed prompts, built locally."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

BENCH_CONFIG = dict(
    vocab_size=32000,
    hidden_size=512,
    intermediate_size=1376,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)


@dataclass
class Workload:
    num_requests: int = 32
    prompt_len: int = 64
    new_tokens: int = 64

    def prompts(self, vocab: int, seed: int = 0) -> list[list[int]]:
        g = torch.Generator().manual_seed(seed)
        return torch.randint(3, vocab, (self.num_requests, self.prompt_len), generator=g).tolist()


QUICK_CONFIG = dict(
    BENCH_CONFIG, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4
)


def make_bench_model(out_dir: Path, config: dict | None = None) -> Path:
    """~55M-parameter Llama (hidden 512, 8 layers, GQA 8/2, vocab 32000), random init, with a tokenizer."""
    if (out_dir / "model.safetensors").exists():
        return out_dir
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**(config or BENCH_CONFIG)), dtype=torch.float32)
    model.save_pretrained(out_dir)
    vocab = {f"t{i}": i for i in range(BENCH_CONFIG["vocab_size"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="t1", eos_token="t2", unk_token="t0"
    ).save_pretrained(out_dir)
    return out_dir


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result
