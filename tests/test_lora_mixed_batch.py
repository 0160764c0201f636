"""One mixed batch through the injected model == PEFT's PeftModel with each row's single adapter."""

from __future__ import annotations

import pytest
import torch

from tests.lora_fixtures import (
    ALL_LINEAR,
    MIXED_CASES,
    inject_and_load,
    load_base,
    make_mixed_adapters,
    make_peft_adapter,
    max_rel_err,
    peft_logits,
)

TOL = 1e-4
# (reference layers + torch op) and (the server's fused, packed layers + the default CPU op)
LAYERS = pytest.mark.parametrize("served,backend", [(False, "torch"), (True, "auto")], ids=["hf", "served"])


@pytest.fixture(scope="module")
def llama_adapters(tiny_llama_dir, tmp_path_factory):
    return make_mixed_adapters(tiny_llama_dir, tmp_path_factory.mktemp("llama_adapters"))


def _greedy(model, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy continuation by full recomputation (no KV cache: this checks the layers, not the cache)."""
    for _ in range(steps):
        logits = model(input_ids=ids, use_cache=False).logits
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


@LAYERS
@torch.inference_mode()
def test_mixed_batch_matches_peft_per_row(tiny_llama_dir, llama_adapters, served, backend):
    assert len(llama_adapters) >= 6
    model, handle, _ = inject_and_load(tiny_llama_dir, llama_adapters, backend=backend, served_layers=served)
    names = list(llama_adapters)
    # Rows in an arbitrary slot order, two base rows, one adapter twice: the op must not rely on sorting.
    row_slots = [3, -1, 0, 5, 1, 6, -1, 4, 2, 3]
    length = 9
    ids = torch.randint(3, 500, (len(row_slots), length), generator=torch.Generator().manual_seed(1))
    handle.backend.plan(row_slots, [length] * len(row_slots))
    got = model(input_ids=ids, use_cache=False).logits
    base = peft_logits(tiny_llama_dir, None, ids)
    for row, slot in enumerate(row_slots):
        want = (
            base[row : row + 1]
            if slot < 0
            else peft_logits(tiny_llama_dir, llama_adapters[names[slot]], ids[row : row + 1])
        )
        assert max_rel_err(got[row : row + 1], want) < TOL, (row, slot)
        if slot >= 0:  # the adapter really changes this row
            assert max_rel_err(base[row : row + 1], want) > 1e-2


@LAYERS
@torch.inference_mode()
def test_mixed_batch_greedy_tokens_match_peft_generate(tiny_llama_dir, llama_adapters, served, backend):
    from peft import PeftModel

    model, handle, _ = inject_and_load(tiny_llama_dir, llama_adapters, backend=backend, served_layers=served)
    names = list(llama_adapters)
    row_slots = [-1, *range(len(names))]
    ids = torch.randint(3, 500, (len(row_slots), 6), generator=torch.Generator().manual_seed(2))
    steps = 4
    # The batch metadata follows the growing length: re-set it before every step.
    out = ids
    for _ in range(steps):
        handle.backend.plan(row_slots, [out.shape[1]] * len(row_slots))
        logits = model(input_ids=out, use_cache=False).logits
        out = torch.cat([out, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    for row, slot in enumerate(row_slots):
        ref = load_base(tiny_llama_dir)
        if slot >= 0:
            ref = PeftModel.from_pretrained(ref, llama_adapters[names[slot]]).eval()
        want = _greedy(ref, ids[row : row + 1], steps)
        assert torch.equal(out[row : row + 1], want), (row, slot)


@torch.inference_mode()
def test_packed_rows_with_unequal_segments_match_peft_module(tiny_llama_dir, llama_adapters):
    """The engine's layout: x is [1, T, in] with sequences back to back, any slot order, gaps of base rows."""
    from peft import PeftModel

    model, handle, _ = inject_and_load(tiny_llama_dir, llama_adapters)
    names = list(llama_adapters)
    module = "model.layers.0.self_attn.q_proj"
    layer = handle.layers[module]
    seqs = [(4, 3), (-1, 2), (0, 5), (4, 1), (2, 7), (-1, 1), (5, 4)]  # (slot, tokens)
    x = torch.randn(1, sum(n for _, n in seqs), layer.spec.in_features)
    handle.backend.plan([s for s, _ in seqs], [n for _, n in seqs])
    got = layer(x)[0]
    row = 0
    for slot, n in seqs:
        if slot < 0:
            ref_layer = load_base(tiny_llama_dir).get_submodule(module)
        else:
            peft = PeftModel.from_pretrained(load_base(tiny_llama_dir), llama_adapters[names[slot]]).eval()
            ref_layer = peft.base_model.model.get_submodule(module)
        assert max_rel_err(got[row : row + n], ref_layer(x[0, row : row + n])) < TOL, (slot, n)
        row += n


@torch.inference_mode()
def test_layer_refuses_a_batch_of_the_wrong_size(tiny_llama_dir, llama_adapters):
    model, handle, _ = inject_and_load(tiny_llama_dir, dict(list(llama_adapters.items())[:1]))
    handle.backend.plan([0, -1], [3, 3])
    with pytest.raises(RuntimeError, match="set for 6 tokens but the layer got 8 rows"):
        model(input_ids=torch.ones(2, 4, dtype=torch.long), use_cache=False)
    handle.backend.clear()  # no batch: every row is the base model
    ids = torch.ones(2, 4, dtype=torch.long)
    assert max_rel_err(model(input_ids=ids).logits, peft_logits(tiny_llama_dir, None, ids)) == 0.0


@LAYERS
@torch.inference_mode()
def test_qwen2_biases_dora_and_lora_bias(tiny_qwen2_dir, tmp_path, served, backend):
    """Qwen2 has q/k/v biases: DoRA must keep the base bias out of its rescale; lora_bias adds its own."""
    cases = {
        "dora": dict(r=8, target_modules=["q_proj", "k_proj", "v_proj", "down_proj"], use_dora=True, seed=11),
        "bias": dict(r=4, target_modules=["q_proj", "v_proj", "o_proj"], lora_bias=True, seed=12),
        "rslora": dict(r=16, target_modules=ALL_LINEAR, use_rslora=True, seed=13),
    }
    dirs = {name: make_peft_adapter(tiny_qwen2_dir, tmp_path / name, **kw) for name, kw in cases.items()}
    model, handle, _ = inject_and_load(
        tiny_qwen2_dir, dirs, max_loras=4, max_rank=16, backend=backend, served_layers=served
    )
    row_slots = [2, 0, -1, 1]
    ids = torch.randint(3, 500, (4, 7), generator=torch.Generator().manual_seed(3))
    handle.backend.plan(row_slots, [7] * 4)
    got = model(input_ids=ids).logits
    names = list(dirs)
    for row, slot in enumerate(row_slots):
        want = peft_logits(tiny_qwen2_dir, dirs[names[slot]] if slot >= 0 else None, ids[row : row + 1])
        assert max_rel_err(got[row : row + 1], want) < TOL, (row, slot)


@torch.inference_mode()
def test_gpt2_conv1d_fan_in_fan_out(tmp_path):
    """transformers' Conv1D stores weights [in, out] (fan_in_fan_out); fused c_attn keeps its name."""
    from transformers import GPT2Config, GPT2LMHeadModel

    base_dir = tmp_path / "gpt2"
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=512, n_positions=64, n_embd=64, n_layer=2, n_head=4)
    GPT2LMHeadModel(config).save_pretrained(base_dir)
    dirs = {
        "plain": make_peft_adapter(base_dir, tmp_path / "plain", r=8, target_modules=["c_attn", "c_proj", "c_fc"],
                                   fan_in_fan_out=True, seed=21),
        "dora": make_peft_adapter(base_dir, tmp_path / "dora", r=4, target_modules=["c_attn", "c_fc"],
                                  fan_in_fan_out=True, use_dora=True, seed=22),
    }  # fmt: skip
    model, handle, spec = inject_and_load(base_dir, dirs, max_loras=2, max_rank=8)
    assert spec.linears["transformer.h.0.attn.c_attn"].transposed
    ids = torch.randint(0, 512, (3, 5), generator=torch.Generator().manual_seed(4))
    handle.backend.plan([1, -1, 0], [5, 5, 5])
    got = model(input_ids=ids).logits
    for row, name in [(0, "dora"), (1, None), (2, "plain")]:
        want = peft_logits(base_dir, dirs[name] if name else None, ids[row : row + 1])
        assert max_rel_err(got[row : row + 1], want) < TOL, name


def test_mixed_cases_cover_the_required_spread():
    """The standard set mixes ranks 4/8/16/64, attention-only vs all-linear, rsLoRA, patterns, DoRA, bias."""
    kw = [c.kwargs for c in MIXED_CASES]
    assert {k["r"] for k in kw} >= {4, 8, 16, 64}
    assert any(k.get("use_dora") for k in kw) and any(k.get("use_rslora") for k in kw)
    assert any(k.get("rank_pattern") for k in kw) and any(k.get("alpha_pattern") for k in kw)
    assert any(k.get("lora_bias") for k in kw) and any(isinstance(k["target_modules"], str) for k in kw)
