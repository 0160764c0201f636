"""Loads a Hugging Face decoder-only causal LM from a local directory, frozen, for serving."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from server.model.attention import register_attention_backend
from server.model.cpu_linear import use_skinny_linears


@dataclass(frozen=True)
class ModelGeometry:
    """The shapes the KV cache is sized from."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    vocab_size: int


def geometry_of(config) -> ModelGeometry:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return ModelGeometry(
        num_layers=text.num_hidden_layers,
        num_kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        max_position_embeddings=getattr(text, "max_position_embeddings", 2048),
        vocab_size=text.vocab_size,
    )


def load_model(model_dir: Path, device: str, dtype: torch.dtype) -> torch.nn.Module:
    """Frozen model with our paged attention installed; weights never need gradients here."""
    if not (Path(model_dir) / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not a Hugging Face model directory (no config.json)")
    backend = register_attention_backend()
    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, config=config, dtype=dtype, local_files_only=True, attn_implementation=backend
    )
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    use_skinny_linears(model)  # CPU fp32 only; a no-op on CUDA
    return model


def load_tokenizer(model_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
