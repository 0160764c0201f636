"""The roofline lines: a decode step's achieved FLOP/s as a fraction of this machine's dense GEMM peak,
and what the adapters' weights cost a mixed step at the machine's DRAM read bandwidth.

The peak is measured, not taken from a datasheet: the best of a few large square GEMMs (``torch.matmul``
and, on CPU, oneDNN's packed linear) in the dtype under test, timed in the same run and with the same
threads as the systems it judges, so a busy or throttled machine lowers the roof and the step alike. A step's work is the dense matmul work
of a Llama forward (2 FLOPs per weight per token: every projection and the LM head; the embedding is a
lookup), plus the attention score and value products over each token's context, plus the LoRA
shrink and expand of the rows that carry an adapter.

The memory line: every adapter in a decode step has its A and B read from DRAM once per step (they
are used by a few rows each and evicted by the ~150 MB of base weights streamed in between), so a
mixed step costs at least ``adapter bytes / DRAM bandwidth`` more than a base step unless those reads
overlap the base GEMMs. ``mixed_step_ceiling`` turns that into the best mixed / base step ratio.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelShape:
    """What the FLOP count of a Llama-shaped decoder needs from its config."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    head_dim: int = 0  # 0: hidden // heads (configs that do not set it)

    @classmethod
    def from_config(cls, config) -> ModelShape:
        return cls(
            config.hidden_size,
            config.intermediate_size,
            config.num_hidden_layers,
            config.num_attention_heads,
            config.num_key_value_heads,
            config.vocab_size,
            getattr(config, "head_dim", None) or 0,
        )

    @classmethod
    def of_model(cls, model_dir) -> ModelShape:
        from transformers import AutoConfig

        return cls.from_config(AutoConfig.from_pretrained(model_dir))

    @property
    def q_width(self) -> int:
        """Query heads x head size (the hidden size unless the config sets ``head_dim``)."""
        return self.heads * (self.head_dim or self.hidden // self.heads)

    def projection_dims(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each projection of one layer."""
        q, kv = self.q_width, self.q_width // self.heads * self.kv_heads
        h, i = self.hidden, self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}  # fmt: skip

    def matmul_params(self) -> int:
        """Weights a token multiplies by: every projection of every layer and the LM head."""
        per_layer = sum(i * o for i, o in self.projection_dims().values())
        return self.layers * per_layer + self.hidden * self.vocab

    def lora_flops_per_token(self, rank: int, targets=LLAMA_PROJECTIONS) -> int:
        """Shrink (in x r) and expand (r x out) on each targeted projection of every layer."""
        dims = self.projection_dims()
        return 2 * rank * self.layers * sum(dims[t][0] + dims[t][1] for t in targets)

    def lora_weights(self, rank: int, targets=LLAMA_PROJECTIONS) -> int:
        """Elements of one adapter's A and B: ``rank x (in + out)`` per targeted projection and layer."""
        dims = self.projection_dims()
        return rank * self.layers * sum(dims[t][0] + dims[t][1] for t in targets)

    def request_flops(self, prompt_len: int, new_tokens: int, lora_rank: int = 0) -> int:
        """FLOPs of one request end to end: the prompt and every generated token but the last go
        through the layers (attending to all positions so far), each generated token through the LM head."""
        layer_params = self.matmul_params() - self.hidden * self.vocab
        positions = prompt_len + new_tokens - 1
        attention = 4 * self.layers * self.q_width * positions * (positions + 1) // 2
        lora = positions * self.lora_flops_per_token(lora_rank) if lora_rank else 0
        return 2 * layer_params * positions + attention + lora + 2 * self.hidden * self.vocab * new_tokens

    def decode_step_flops(self, batch: int, context: int, lora_rows: int = 0, lora_rank: int = 0) -> int:
        """FLOPs of one decode step of ``batch`` sequences at ``context`` tokens each."""
        dense = 2 * self.matmul_params() * batch
        attention = 4 * self.layers * self.q_width * context * batch  # QK^T and PV, every head
        return dense + attention + lora_rows * self.lora_flops_per_token(lora_rank)


def gemm_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 5, device: str = "cpu") -> float:
    """FLOP/s of the fastest ``n x n @ n x n`` this torch runs here: the best of ``repeats`` timed calls
    (after one warm-up) of ``torch.matmul`` and, on CPU, of oneDNN's packed linear (what the engine's
    linears run, ``server/model/cpu_linear.py``). Both, because on AMD CPUs ``torch.matmul`` in fp32 is
    MKL's AVX2 code: measured on the development machine (AMD EPYC, 2 cores, AVX-512), 217 GFLOP/s for
    ``torch.matmul`` against 496 for oneDNN, so a roof from ``matmul`` alone read the decode step at
    twice its real fraction of the machine."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    calls = [lambda: torch.matmul(a, b)]
    if device == "cpu":
        from server.model.cpu_linear import onednn_packable

        if onednn_packable(b):
            packed = torch.ops.mkldnn._reorder_linear_weight(b, None)
            calls.append(lambda: torch.ops.mkldnn._linear_pointwise(a, packed, None, "none", [None], ""))
    best = float("inf")
    for call in calls:
        call()
        for _ in range(repeats):
            if device != "cpu":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            call()
            if device != "cpu":
                torch.cuda.synchronize(device)
            best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def dram_read_bandwidth(megabytes: int = 256, repeats: int = 5) -> float:
    """Bytes/s of the best of ``repeats`` full reads (a sum) of an fp32 tensor far larger than the
    caches, with this process's threads: the roof for weights that must come from DRAM."""
    x = torch.ones(megabytes * 2**20 // 4)
    x.sum()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    return x.numel() * 4 / best


def mixed_step_ceiling(base_step_s: float, adapter_bytes: int, bandwidth: float) -> float:
    """The best mixed / base decode-step ratio when the adapters' weights are read from DRAM after the
    base step's work, not during it: ``base / (base + bytes / bandwidth)``."""
    return base_step_s / (base_step_s + adapter_bytes / bandwidth)


def decode_step_rate(steps, shape: ModelShape, lora_rank: int = 0) -> tuple[float, int, int] | None:
    """(median FLOP/s, batch, steps) over the pure decode steps at the largest batch in ``steps``
    (each with ``seconds``, ``batch``, ``context``, ``lora_rows``); None when there were none."""
    if not steps:
        return None
    batch = max(s.batch for s in steps)
    rates = sorted(
        shape.decode_step_flops(s.batch, round(s.context), s.lora_rows, lora_rank) / s.seconds
        for s in steps
        if s.batch == batch
    )
    return statistics.median(rates), batch, len(rates)


def roofline_line(label: str, achieved: float, peak: float) -> str:
    return f"{label:<58} {achieved / 1e9:8.1f} GFLOP/s = {100 * achieved / peak:5.1f} % of the GEMM peak"
