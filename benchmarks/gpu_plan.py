"""What ``make gpu-check`` runs, as one object: the real plan for a GPU, and a CPU smoke plan.

The smoke plan runs every line of the check on the CPU with tiny shapes (Triton kernels under
``TRITON_INTERPRET=1``, fp32), so the script is exercised where no GPU is (``--smoke``); its numbers
mean nothing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class CheckPlan:
    device: str = "cuda"
    dtype: torch.dtype = torch.bfloat16
    shapes: dict[str, tuple[str, dict]] = field(
        default_factory=lambda: {"1b": ("llama-1b", {}), "8b": ("llama-8b", {})}
    )  # part suffix -> (server.model.synthetic preset, config overrides)
    contexts: tuple[int, ...] = (512, 2048)
    batches: tuple[int, ...] = (1, 8, 32, 64)
    adapter_counts: tuple[int, ...] = (0, 8, 64)
    baseline_points: tuple[tuple[int, int], ...] = ((512, 8), (512, 64), (2048, 64))  # (context, batch)
    rank: int = 16
    parity_steps: int = 32
    bench_warmup: int = 3
    bench_steps: int = 12
    attention_heads: tuple[int, int, int] = (32, 8, 128)  # kernel parity: heads, kv heads, head dim
    kernel_scale: int = 1  # divides the kernel-parity context lengths
    attention_backend: str = "auto"
    lora_backend: str = "auto"

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def timed(self, fn) -> float:
        """Seconds of ``fn()``, synchronized before and after."""
        self.sync()
        start = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - start

    def points(self) -> list[tuple[int, int, int]]:
        """(context, batch, distinct adapters): base at every batch, adapters where the batch holds them."""
        return [(c, b, k) for c in self.contexts for b in self.batches for k in self.adapter_counts
                if k == 0 or (k <= b and b >= min(k, 8))]  # fmt: skip


GPU = CheckPlan()
SMOKE = CheckPlan(
    device="cpu",
    dtype=torch.float32,
    shapes={"1b": ("tiny", {}), "8b": ("bench-quick", {"vocab_size": 512})},
    contexts=(16, 40),
    batches=(1, 4, 8),
    adapter_counts=(0, 2, 8),
    baseline_points=((16, 4),),
    rank=4,
    parity_steps=4,
    bench_warmup=1,
    bench_steps=2,
    attention_heads=(4, 2, 16),
    kernel_scale=16,
    attention_backend="triton",
    lora_backend="triton",
)
