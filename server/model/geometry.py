"""The shapes of a loaded model that the engine sizes its buffers from (KV cache, vocab checks)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelGeometry:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    vocab_size: int

    @classmethod
    def of(cls, config) -> ModelGeometry:
        """From a transformers config (the text config of multimodal wrappers)."""
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = text.num_attention_heads
        return cls(
            num_layers=text.num_hidden_layers,
            num_kv_heads=getattr(text, "num_key_value_heads", None) or heads,
            head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
            max_position_embeddings=getattr(text, "max_position_embeddings", 2048),
            vocab_size=text.vocab_size,
        )
