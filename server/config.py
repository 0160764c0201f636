"""One settings object for the whole server.

Every knob lives here so that the CLI, environment variables (``LORAPLEX_*``) and tests all
configure the same thing; components receive the validated object (or the slice they need)
instead of reading the environment themselves.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal, TypeVar

from pydantic import BeforeValidator, Field, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL_DIR = REPO_ROOT / "models" / "demo"
DEFAULT_STORE_DIR = REPO_ROOT / "adapters_store"

T = TypeVar("T")


def split_list(value):
    """A list setting from text: a JSON list, or comma-separated items (what operators type in a
    Kubernetes Secret or ``docker run -e``: ``LORAPLEX_API_KEYS=a,b``). List items are split the same
    way (``--api-keys a,b``), so commas always separate items."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            items = json.loads(text)
            if not isinstance(items, list):
                raise ValueError("expected a JSON list")
            return items
        return [item.strip() for item in text.split(",") if item.strip()]
    if isinstance(value, (list, tuple)):
        return [part for item in value for part in (split_list(item) if isinstance(item, str) else [item])]
    return value


# A list setting: from env/flags as JSON or comma-separated (NoDecode: not JSON-only, pydantic-settings'
# default for complex types).
TextList = Annotated[list[T], NoDecode, BeforeValidator(split_list)]


class Settings(BaseSettings):
    """Server configuration; env vars use the ``LORAPLEX_`` prefix (lists as JSON or comma-separated,
    mappings as JSON)."""

    model_config = SettingsConfigDict(env_prefix="LORAPLEX_", extra="ignore")

    # --- base model -------------------------------------------------------------------------
    model: Path = Field(DEFAULT_MODEL_DIR, description="Local Hugging Face model directory.")
    served_model_name: str | None = Field(None, description="Name clients use for the base model.")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="auto, cpu, cuda, cuda:N")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto",
        description="'auto': bf16 on CUDA; on CPU bf16 for bf16/fp16 checkpoints where the CPU has native "
        "bf16 (avx512_bf16, AMX), else float32.",
    )
    seed: int = 0
    runtime_tuning: bool = Field(
        True,
        description="On CPU, restart once under tcmalloc/jemalloc and Intel/LLVM OpenMP where installed, "
        "OMP threads = usable cores, bound (server/runtime_env.py); logged at start-up.",
    )

    # --- engine -----------------------------------------------------------------------------
    max_num_seqs: int = Field(64, ge=1, description="Cap on sequences in the running batch.")
    max_num_batched_tokens: int = Field(2048, ge=16, description="Token budget of one step.")
    max_prefill_tokens_while_decoding: int | None = Field(
        None,
        ge=1,
        description="Prompt tokens a step that also decodes may take (bounds running streams' "
        "inter-token latency while prompts arrive); None: 256 on CPU, the whole step budget on CUDA.",
    )
    max_model_len: int | None = Field(None, ge=16, description="Context cap; default: the model's.")
    block_size: int = Field(16, ge=1, description="Tokens per KV-cache block.")
    num_kv_blocks: int | None = Field(
        None,
        ge=2,
        description="KV blocks; default: what gpu_memory_utilization leaves (CUDA) or kv_cache_memory_gb.",
    )
    kv_cache_memory_gb: float = Field(
        1.0, gt=0, description="KV cache budget on the CPU (on CUDA only when set explicitly)."
    )
    gpu_memory_utilization: float = Field(
        0.90,
        gt=0,
        le=1,
        description="Share of the GPU's memory this server may use; the KV cache gets what "
        "weights, adapter slots and the profiled activation peak leave of it.",
    )
    max_queue_len: int = Field(1024, ge=1, description="Waiting requests before 429.")
    engine_step_timeout_s: float = Field(
        300.0,
        ge=0,
        description="A step running longer than this makes /health fail (Kubernetes restarts the pod) "
        "and /ready 503; 0 = off.",
    )
    attention_backend: Literal["auto", "torch", "triton", "flashinfer"] = Field(
        "auto",
        description="Paged attention: 'auto' = flashinfer if installed on CUDA, else triton on CUDA, "
        "else torch (the CPU reference).",
    )
    enforce_eager: bool = Field(
        False,
        description="No CUDA graphs and no compiled CPU decode: decode steps run eagerly (same outputs).",
    )
    compile_decode: bool = Field(
        False,
        description="CPU: torch.compile the decode forward at start-up (one dynamic-batch graph for every "
        "bucket; ~1 min of start-up on 2 cores, cached across restarts; ~5-10% faster decode measured).",
    )
    prefix_caching: bool = Field(
        True, description="Reuse the KV blocks of cached prompt prefixes (per adapter and weights version)."
    )
    adapter_max_wait_s: float = Field(
        2.0,
        ge=0,
        description="When adapter slots are short, requests of resident adapters may overtake a waiting "
        "request until it has waited this long; the same bound limits how long a new prompt may be held "
        "back while a step completes a shared prefix (finish-prefix-first).",
    )

    # --- LoRA -------------------------------------------------------------------------------
    enable_lora: bool = Field(True, description="Wrap the base model's linears for LoRA serving.")
    adapter_store: Path = Field(DEFAULT_STORE_DIR, description="Directory of PEFT adapters.")
    max_loras: int = Field(8, ge=1, description="Slot memory, in adapters of max_lora_rank; paged by rank.")
    max_lora_rank: int = Field(64, ge=1, description="Largest adapter rank accepted.")
    max_cpu_loras: int = Field(64, ge=1, description="Adapters kept parsed in host memory.")
    lora_dtype: Literal["auto", "bfloat16", "float16"] = Field(
        "auto",
        description="dtype of the adapter weights in the device slots: 'auto' is the model's; bfloat16 or "
        "float16 under a float32 model halve the bytes a mixed-batch step streams (its LoRA time on CPU) "
        "and the slots' memory, at half-precision rounding of the weights (computed in fp32).",
    )
    lora_backend: Literal["auto", "torch", "cpu", "triton"] = Field(
        "auto", description="LoRA op: 'auto' = triton on CUDA, the native 'cpu' kernel on CPU, else 'torch'."
    )
    merged_adapter: str | None = Field(None, description="Serve this adapter merged into the base.")
    export_dir: Path = Field(REPO_ROOT / "exports", description="Where merged models are written.")
    allowed_lora_roots: TextList[Path] = Field(
        default_factory=list, description="Roots that /v1/load_lora_adapter may read lora_path from."
    )
    max_adapter_bytes: int = Field(512 * 1024 * 1024, ge=1024, description="Upload size cap.")

    # --- HTTP -------------------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_keys: TextList[str] = Field(default_factory=list, description="Bearer keys; empty = no auth.")
    admin_keys: TextList[str] = Field(default_factory=list, description="Keys allowed to mutate adapters.")
    key_adapter_allowlists: dict[str, list[str]] = Field(
        default_factory=dict, description="Per-key glob patterns of usable adapters."
    )
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    drain_timeout_s: float = Field(
        30.0,
        ge=0,
        description="On SIGTERM, how long running requests may take to finish; those still running then "
        "end with a 503 error (streams: an error event and [DONE]).",
    )
    metrics_require_key: bool = Field(
        False,
        description="Put /metrics behind the API keys (off: the inference gateway scrapes it; its labels "
        "name adapters).",
    )

    @model_validator(mode="after")
    def _check_budget(self) -> Settings:
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError("max_num_batched_tokens must be >= max_num_seqs (one token per sequence)")
        return self

    def resolved_device(self) -> str:
        import torch

        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

    def resolved_dtype(self):
        """An explicit dtype as given. 'auto': bf16 on CUDA (fp16 where bf16 is missing); on CPU the
        checkpoint's half precision (bf16, or fp16 run as bf16) where the CPU computes bf16 natively,
        else float32 (emulated bf16 is slower than fp32, and fp16 matmuls on CPU are slower still)."""
        import torch

        if self.dtype != "auto":
            return getattr(torch, self.dtype)
        if self.resolved_device().startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if checkpoint_dtype(self.model) in ("bfloat16", "float16") and cpu_has_native_bf16():
            return torch.bfloat16
        return torch.float32


def checkpoint_dtype(model_dir: Path) -> str | None:
    """The dtype a Hugging Face checkpoint was saved in (``config.json``), if it says."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    text = config.get("text_config") or {}
    value = config.get("dtype") or config.get("torch_dtype") or text.get("dtype") or text.get("torch_dtype")
    return value if isinstance(value, str) else None


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 arithmetic (x86 avx512_bf16 or AMX, Arm bf16), from the kernel's
    CPU flags. torch's own ``mkldnn`` bf16 check is true on any AVX-512 CPU, where bf16 is emulated."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    for line in info.splitlines():
        if line.startswith(("flags", "Features")):
            flags = set(line.split(":", 1)[-1].split())
            return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})
    return False
