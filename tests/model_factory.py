"""The tests' tiny random-init models (``server.model.synthetic`` at its 'tiny' shape)."""

from __future__ import annotations

from pathlib import Path

from server.model.synthetic import byte_bpe_tokenizer, make_random_model, model_config


def make_tiny_model(out_dir: Path, kind: str = "llama", seed: int = 0, **overrides) -> Path:
    """Random-init model with larger-than-default weights so logits are not flat (no argmax ties)."""
    config = model_config(kind, "tiny", **overrides)
    return make_random_model(out_dir, config, byte_bpe_tokenizer(config.vocab_size), seed, weight_std=0.08)
