"""KV-cache sizing from the GPU memory budget (the arithmetic, with made-up device figures), the
profiling step's shape, the bf16 adapter slots, and that every CUDA-side module imports on a CPU."""

from __future__ import annotations

import importlib

import pytest
import torch

from server.engine.memory_budget import GiB, InsufficientMemoryError, MemoryBudget, dummy_step, sampler_bytes


def test_kv_takes_what_the_budget_leaves():
    # 80 GiB card, 20 GiB in use after weights and slots, 2 GiB activation peak, 90 %: 50 GiB of KV.
    budget = MemoryBudget(total=80 * GiB, free=60 * GiB, utilization=0.9, activation_peak=2 * GiB)
    assert budget.in_use == 20 * GiB
    assert budget.kv_bytes == 50 * GiB
    assert budget.kv_blocks(bytes_per_block=2 * 2**20, min_blocks=100) == 50 * 512


def test_too_little_memory_says_how_much_is_missing():
    budget = MemoryBudget(total=24 * GiB, free=4 * GiB, utilization=0.9, activation_peak=int(0.6 * GiB))
    # 21.6 - 20 - 0.6 = 1.0 GiB left; 1024 blocks of 2 MiB need 2 GiB: 1 GiB missing.
    with pytest.raises(InsufficientMemoryError, match=r"1\.00 GiB missing") as err:
        budget.kv_blocks(bytes_per_block=2 * 2**20, min_blocks=1024)
    assert "--gpu-memory-utilization" in str(err.value)
    other = MemoryBudget(total=24 * GiB, free=1 * GiB, utilization=0.5, activation_peak=0)
    with pytest.raises(InsufficientMemoryError, match=r"leaves 0\.00 GiB"):
        other.kv_blocks(2**20, 1)


def test_dummy_step_is_the_largest_step():
    seqs = dummy_step(max_num_seqs=3, max_num_tokens=10, block_size=4)
    assert [s.num_new_tokens for s in seqs] == [4, 3, 3]
    assert [s.block_table for s in seqs] == [[0], [1], [2]]
    assert all(s.will_sample for s in seqs)
    assert sampler_bytes(64, 128256) == 3 * 64 * 128256 * 4


def test_adapter_slots_take_the_model_dtype(tiny_llama_dir, tmp_path):
    """bf16 model: adapters parsed in fp32 land in bf16 slot buffers, rounded once at slot write."""
    from tests.engine_utils import build_test_runtime
    from tests.lora_fixtures import ALL_LINEAR, make_peft_adapter

    make_peft_adapter(tiny_llama_dir, tmp_path / "store" / "a", r=4, target_modules=ALL_LINEAR)
    rt = build_test_runtime(tiny_llama_dir, adapter_store=tmp_path / "store", dtype="bfloat16", max_loras=1,
                            num_kv_blocks=16)  # fmt: skip
    assert rt.dtype == torch.bfloat16
    adapter, _ = rt.lora.cache.get("a")
    slot_id = rt.lora.manager.activate({"a"})["a"]
    name, weights = next(iter(adapter.modules.items()))
    slot = rt.lora.model.layers[name].slot_weights
    assert slot.a.dtype == slot.b.dtype == torch.bfloat16
    member = slot.names.index(name)
    [page] = slot.table.pages_of(slot_id)  # rank 4: one page
    assert torch.equal(slot.a[page, :, member, :4], weights.a.t().to(torch.bfloat16))
    assert rt.engine.core.runner.attention.kv_caches[0].dtype == torch.bfloat16
    rt.close()


@pytest.mark.parametrize(
    "module",
    [
        "server.model.attention.triton_kernels",
        "server.model.attention.triton_paged",
        "server.model.attention.flashinfer_paged",
        "server.lora.ops.sgmv_triton",
        "server.engine.decode_graphs",
        "server.engine.memory_budget",
        "benchmarks.gpu_check",
        "benchmarks.gpu_bench",
        "benchmarks.gpu_parity",
    ],
)
def test_cuda_side_modules_import_on_cpu(module):
    """No GPU in CI: a broken import of the GPU path must fail here, not be skipped silently."""
    importlib.import_module(module)
