"""Random-weight decoder-only models of given shapes, in Hugging Face format, built locally.

Nothing may download weights here, yet tests, benchmarks and hardware checks need real HF model
directories: this is the one factory for them. A shape is a named preset (``SHAPES``) plus overrides,
for Llama or Qwen2 (same fields; Qwen2 adds q/k/v biases). The weights are seeded, so a shape and a
seed always give the same model. ``weight_std`` widens the init so tiny models have peaked logits
(no argmax ties between implementations that round differently).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

_COMMON = {"bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False}
_LLAMA_3 = {"vocab_size": 128256, "max_position_embeddings": 8192, "rope_theta": 500000.0}

# (vocab, hidden, intermediate, layers, heads, kv heads, max positions) and what else differs.
SHAPES: dict[str, dict] = {
    # the tests' model: two layers, GQA, a byte-level vocabulary of 512
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
    # the CPU benchmark's ~55M-parameter model
    "bench": dict(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                  num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=2048),
    # the benchmark's smoke-test size (--quick)
    "bench-quick": dict(vocab_size=32000, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048),
    # the embedded demo model (scripts/train_demo_model.py; its vocabulary comes from its tokenizer)
    "demo": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=6, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-5,
                 tie_word_embeddings=True),
    # real shapes for GPU runs: Llama-3.2-1B and Llama-3-8B
    "llama-1b": dict(_LLAMA_3, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True),
    "llama-8b": dict(_LLAMA_3, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=8),
}  # fmt: skip
_CONFIG_CLASSES = {"llama": LlamaConfig, "qwen2": Qwen2Config}


def model_config(kind: str = "llama", shape: str = "tiny", **overrides) -> PretrainedConfig:
    """The transformers config of ``kind`` ('llama' | 'qwen2') at preset ``shape``, with overrides."""
    if kind not in _CONFIG_CLASSES:
        raise ValueError(f"unknown model kind {kind!r}; expected one of {sorted(_CONFIG_CLASSES)}")
    return _CONFIG_CLASSES[kind](**{**_COMMON, **SHAPES[shape], **overrides})


def make_random_model(
    out_dir: Path,
    config: PretrainedConfig,
    tokenizer: PreTrainedTokenizerFast,
    seed: int = 0,
    weight_std: float | None = None,
) -> Path:
    """Saves a seeded random-init model of ``config`` and ``tokenizer`` into ``out_dir``."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if weight_std is not None:
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.normal_(0.0, weight_std)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return Path(out_dir)


def build_random_model(
    config: PretrainedConfig, device: str | torch.device, dtype: torch.dtype, seed: int = 0,
    attn_implementation: str = "sdpa",
) -> torch.nn.Module:  # fmt: skip
    """A seeded random-init model built directly on ``device`` in ``dtype`` (transformers' own init,
    run there): an 8B model in seconds on a GPU, never written to disk. Frozen, in eval mode."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    return model.eval().requires_grad_(False)


def use_attention(model: torch.nn.Module, implementation: str) -> None:
    """Routes ``model``'s attention layers to ``implementation`` (a registered name, e.g. the engine's)."""
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(implementation)
    else:  # older transformers: every layer reads the shared config
        model.config._attn_implementation = implementation


def byte_bpe_tokenizer(vocab_size: int, corpus: Iterable[str] | None = None) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained in-process on Python's bundled docs text (or ``corpus``): real text
    round-trips. The docs alone give a few thousand merges; a larger corpus fills a larger vocabulary."""
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus if corpus is not None else list(topics.values())[:40], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


# Letters that no normalizer, pre-tokenizer or byte fallback touches: CJK ideographs, then Hangul.
_CHAR_BLOCKS = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0xAC00, 0xD7A3))
_CHAR_SPECIALS = ("<unk>", "<s>", "</s>")


def char_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """Token i >= 3 is one distinct CJK or Hangul character (0-2: ``<unk> <s> </s>``).

    For workloads of token ids that must also travel as text: every tokenizer splits such text one
    character per token, so a decoded prompt re-encodes to the same ids in every server. It has the
    shape of a Llama tokenizer.json (BPE, byte fallback, a decoder sequence), which llama.cpp's GGUF
    converter reads as a SentencePiece vocabulary with the same ids; no merges, no space prefix, no BOS.
    """
    from tokenizers import Tokenizer, decoders, models, processors

    letters = (chr(c) for lo, hi in _CHAR_BLOCKS for c in range(lo, hi + 1))
    pieces = list(_CHAR_SPECIALS) + [next(letters) for _ in range(vocab_size - len(_CHAR_SPECIALS))]
    tok = Tokenizer(
        models.BPE({p: i for i, p in enumerate(pieces)}, [], unk_token="<unk>", byte_fallback=True)
    )
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    # A no-op post-processor (ids untouched) that tells the GGUF converter "no BOS": without one,
    # llama.cpp would prepend <s> to text prompts that the other servers take as they are.
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", add_prefix_space=False
    )


def word_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """Token i is the word ``t<i>``, decoded with spaces between tokens (WordPiece-style): any
    vocabulary size at once, for token-id workloads and for decoders that put spaces between tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="t1", eos_token="t2", unk_token="t0")
