"""The shapes of a loaded model that the engine sizes its buffers from (KV cache, vocab checks), and
the attention features a backend must support for it (checked once, at start-up)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelGeometry:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    vocab_size: int
    num_heads: int = 0  # query heads; 0 when unknown (hand-built geometries in tests)
    sliding_window: int | None = None  # on some or all layers (Mistral, Gemma 2, Qwen2 when enabled)
    softcap: float | None = None  # attention-logit soft-capping (Gemma 2)

    @classmethod
    def of(cls, config) -> ModelGeometry:
        """From a transformers config (the text config of multimodal wrappers)."""
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = text.num_attention_heads
        window = getattr(text, "sliding_window", None)
        if getattr(text, "use_sliding_window", True) is False:
            window = None
        return cls(
            num_layers=text.num_hidden_layers,
            num_kv_heads=getattr(text, "num_key_value_heads", None) or heads,
            head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
            max_position_embeddings=getattr(text, "max_position_embeddings", 2048),
            vocab_size=text.vocab_size,
            num_heads=heads,
            sliding_window=window or None,
            softcap=getattr(text, "attn_logit_softcapping", None) or None,
        )
