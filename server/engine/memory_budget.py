"""How many KV blocks fit on the GPU, and the profiling step that measures what the rest needs.

On CUDA the server may use ``gpu_memory_utilization`` of the device's memory. What is in use once the
weights and adapter slots are loaded (everything on the device: this process's tensors, its CUDA
context, and any other process) and the activation peak of the largest step (measured by running a
dummy step of ``max_num_batched_tokens`` tokens, plus the sampler's working set) come off first; the
KV cache takes the rest. Too little for one step's worth of blocks fails start-up, saying how much
memory is missing and which knobs free some.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from server.engine.model_runner import ModelRunner
from server.engine.sequence import Sequence
from server.engine.types import SamplingParams

GiB = 2**30


class InsufficientMemoryError(RuntimeError):
    """Start-up cannot fit the smallest KV cache that serves one full step."""


@dataclass(frozen=True)
class MemoryBudget:
    """Device memory figures in bytes (``free`` and ``total`` as ``torch.cuda.mem_get_info`` reports)."""

    total: int
    free: int
    utilization: float
    activation_peak: int

    @property
    def in_use(self) -> int:
        return self.total - self.free

    @property
    def kv_bytes(self) -> int:
        """What the KV cache may take (negative when even the rest does not fit)."""
        return int(self.total * self.utilization) - self.in_use - self.activation_peak

    def kv_blocks(self, bytes_per_block: int, min_blocks: int) -> int:
        """Blocks that fit, or ``InsufficientMemoryError`` if fewer than ``min_blocks`` do."""
        blocks = max(0, self.kv_bytes) // bytes_per_block
        if blocks < min_blocks:
            missing = min_blocks * bytes_per_block - self.kv_bytes
            raise InsufficientMemoryError(
                f"the KV cache needs at least {min_blocks} blocks ({min_blocks * bytes_per_block / GiB:.2f} GiB) "
                f"but gpu_memory_utilization={self.utilization} of {self.total / GiB:.2f} GiB leaves "
                f"{max(0, self.kv_bytes) / GiB:.2f} GiB after {self.in_use / GiB:.2f} GiB in use (weights, "
                f"adapter slots, CUDA context, other processes) and a {self.activation_peak / GiB:.2f} GiB "
                f"activation peak: {missing / GiB:.2f} GiB missing. Raise --gpu-memory-utilization, or lower "
                "--max-num-batched-tokens, --max-num-seqs, --max-loras or --max-lora-rank."
            )
        return blocks


def sampler_bytes(max_num_seqs: int, vocab_size: int) -> int:
    """The sampler's float32 working set for a full batch (logits, probabilities, noise)."""
    return 3 * max_num_seqs * vocab_size * 4


def dummy_step(max_num_seqs: int, max_num_tokens: int, block_size: int) -> list[Sequence]:
    """The largest step: ``max_num_tokens`` prompt tokens over ``max_num_seqs`` sequences, every one
    sampling, on consecutive blocks starting at 0."""
    num_seqs = min(max_num_seqs, max_num_tokens)
    seqs, next_block = [], 0
    for i in range(num_seqs):
        n = max_num_tokens // num_seqs + (1 if i < max_num_tokens % num_seqs else 0)
        seq = Sequence(f"profile-{i}", [0] * n, SamplingParams(max_tokens=1))
        blocks = -(-n // block_size)
        seq.block_table = list(range(next_block, next_block + blocks))
        seq.num_new_tokens = n
        next_block += blocks
        seqs.append(seq)
    return seqs


def profile_activation_peak(runner: ModelRunner, seqs: list[Sequence]) -> int:
    """Bytes the forward of ``seqs`` allocates at its peak beyond what is already allocated (CUDA)."""
    device = runner.device
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    runner.run(seqs)
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before
