"""Loads a Hugging Face decoder-only causal LM from a local directory, frozen, for serving."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from server.config import cpu_has_native_bf16
from server.model.attention.hf_bridge import BACKEND_NAME, register_attention_interface
from server.model.cpu_linear import use_packed_linears
from server.model.fused_linear import fuse_projections

log = logging.getLogger(__name__)


def load_model(model_dir: Path, device: str, dtype: torch.dtype) -> torch.nn.Module:
    """Frozen model whose attention layers call our paged backend; weights never need gradients here.

    Sibling projections (q/k/v, gate/up) are fused into single GEMMs and, on CPU, every linear runs
    through oneDNN with a packed weight; module names and per-module weights stay as loaded.
    """
    if not (Path(model_dir) / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not a Hugging Face model directory (no config.json)")
    if torch.device(device).type == "cpu" and dtype == torch.bfloat16 and not cpu_has_native_bf16():
        log.warning(
            "bfloat16 on a CPU without native bf16 (no avx512_bf16/AMX): emulated, slower than float32"
        )
    attn_implementation = register_attention_interface()
    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, config=config, dtype=dtype, local_files_only=True, attn_implementation=attn_implementation
    )
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    fuse_projections(model)
    use_packed_linears(model)  # CPU only; a no-op on CUDA
    return model


def check_serving_model(model: torch.nn.Module) -> None:
    """Raises unless ``model``'s attention layers call the engine's backend (``hf_bridge``)."""
    implementation = getattr(model.config, "_attn_implementation", None)
    if implementation != BACKEND_NAME:
        raise ValueError(
            f"the model's attention implementation is {implementation!r}; models served by loraplex are "
            f"built with attn_implementation={BACKEND_NAME!r} (load_model and the synthetic builders do this)"
        )


def load_tokenizer(model_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)


def eos_token_ids(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    """Every id that ends generation: the generation config's (one or a list) and the tokenizer's."""
    ids: set[int] = set()
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    if isinstance(eos, int):
        ids.add(eos)
    elif isinstance(eos, (list, tuple)):
        ids.update(int(e) for e in eos)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return frozenset(ids)
