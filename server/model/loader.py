"""Loads a Hugging Face decoder-only causal LM from a local directory, frozen, for serving."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from server.config import cpu_has_native_bf16
from server.model.attention.hf_bridge import BACKEND_NAME, register_attention_interface
from server.model.cpu_linear import use_packed_linears
from server.model.fused_linear import fuse_projections
from server.model.native_norm import use_native_rms_norms

log = logging.getLogger(__name__)

# transformers reads this at each from_pretrained: set, it converts the checkpoint's tensors on the
# calling thread instead of a pool of worker threads. `loraplex serve` sets it at process start on
# CPU, before any thread runs (``server/cli.py``); library callers get it per load, below.
ASYNC_LOAD_OFF = "HF_DEACTIVATE_ASYNC_LOAD"
_env_lock = threading.Lock()  # two concurrent loads must not undo each other's setting


@contextmanager
def weights_loaded_on_this_thread(device: str) -> Iterator[None]:
    """On CPU, from_pretrained inside this block casts the weights on the calling thread.

    Why: transformers converts tensors (e.g. an fp32 checkpoint to bf16) on a pool of worker threads;
    every thread that runs a parallel torch op starts its own OpenMP team, and under a bound OpenMP
    runtime (``server/runtime_env.py``: ``KMP_AFFINITY``) the team the engine later gets can end up
    with its worker on the engine's own core. Measured on the development machine (bf16, batch-32
    decode step under the runtime set-up): 14.7 ms with the pool, 8.1-8.8 ms without; fp32 checkpoints
    served in fp32 need no cast and were not affected. A user's own setting of the variable wins.
    """
    if torch.device(device).type != "cpu" or ASYNC_LOAD_OFF in os.environ:
        yield
        return
    with _env_lock:
        os.environ[ASYNC_LOAD_OFF] = "1"
        try:
            yield
        finally:
            os.environ.pop(ASYNC_LOAD_OFF, None)


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
    with weights_loaded_on_this_thread(device):
        model = AutoModelForCausalLM.from_pretrained(
            model_dir,
            config=config,
            dtype=dtype,
            local_files_only=True,
            attn_implementation=attn_implementation,
        )
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    fuse_projections(model)
    use_packed_linears(model)  # CPU only; a no-op on CUDA
    use_native_rms_norms(model)  # CPU only, likewise
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
