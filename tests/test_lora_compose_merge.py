"""Weighted composition == PEFT's add_weighted_adapter("cat") and the explicit sum; merged == unmerged."""

from __future__ import annotations

import pytest
import torch

from server.lora.adapter import AdapterError, load_peft_adapter
from server.lora.compose import compose_adapters
from server.lora.merge import export_merged, merge_adapter_into_model
from server.lora.spec import BaseModelSpec
from tests.lora_fixtures import (
    ALL_LINEAR,
    inject_and_load,
    load_base,
    make_peft_adapter,
    max_rel_err,
    peft_logits,
)

TOL = 1e-4


@pytest.fixture(scope="module")
def parts(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("compose")
    return {
        "attn4": make_peft_adapter(tiny_llama_dir, root / "attn4", r=4, seed=1),
        "all8": make_peft_adapter(tiny_llama_dir, root / "all8", r=8, target_modules=ALL_LINEAR, use_rslora=True, seed=2),
        "pat16": make_peft_adapter(
            tiny_llama_dir, root / "pat16", r=16, target_modules=["q_proj", "up_proj"], rank_pattern={"up_proj": 4},
            alpha_pattern={"q_proj": 3}, seed=3,
        ),
        "dora": make_peft_adapter(tiny_llama_dir, root / "dora", r=4, use_dora=True, seed=4),
        "bias": make_peft_adapter(tiny_llama_dir, root / "bias", r=4, lora_bias=True, seed=5),
    }  # fmt: skip


@pytest.fixture(scope="module")
def spec(tiny_llama_dir):
    return BaseModelSpec.from_model(load_base(tiny_llama_dir))


def _load(parts, spec, *names):
    return [load_peft_adapter(parts[n], n, spec, 64) for n in names]


@torch.inference_mode()
def test_compose_equals_peft_cat(tiny_llama_dir, parts, spec):
    from peft import PeftModel

    names, weights = ["attn4", "all8", "pat16"], [0.7, -1.3, 0.4]
    composed = compose_adapters(list(zip(_load(parts, spec, *names), weights, strict=True)), "mix")
    assert composed.modules["model.layers.0.self_attn.q_proj"].rank == 4 + 8 + 16
    assert composed.modules["model.layers.0.mlp.down_proj"].rank == 8  # only all8 touches it
    assert composed.parts == list(zip(names, weights, strict=True))

    peft = PeftModel.from_pretrained(load_base(tiny_llama_dir), parts[names[0]], adapter_name=names[0])
    for n in names[1:]:
        peft.load_adapter(parts[n], adapter_name=n)
    peft.add_weighted_adapter(names, weights, "mix", combination_type="cat")
    peft.set_adapter("mix")
    ids = torch.randint(3, 500, (2, 8), generator=torch.Generator().manual_seed(0))
    want = peft.eval()(input_ids=ids).logits

    model, handle, _ = inject_and_load(tiny_llama_dir, {}, max_loras=2, max_rank=64)
    handle.set_slot(1, composed)
    handle.backend.plan([1, 1], [8, 8])
    assert max_rel_err(model(input_ids=ids).logits, want) < TOL


def test_compose_is_the_exact_weighted_sum_including_lora_bias(parts, spec):
    adapters = _load(parts, spec, "attn4", "bias", "all8")
    weights = [2.0, -0.5, 1.25]
    composed = compose_adapters(list(zip(adapters, weights, strict=True)), "sum")
    for module, lora in composed.modules.items():
        want = sum(w * a.modules[module].scale * a.modules[module].b @ a.modules[module].a
                   for a, w in zip(adapters, weights, strict=True) if module in a.modules)  # fmt: skip
        torch.testing.assert_close(lora.scale * lora.b @ lora.a, want, rtol=1e-5, atol=1e-6)
    q = "model.layers.1.self_attn.q_proj"
    torch.testing.assert_close(
        composed.modules[q].bias, -0.5 * adapters[1].modules[q].scale * adapters[1].modules[q].bias
    )


def test_compose_refuses_dora_and_rank_overflow(parts, spec):
    attn4, dora, all8 = _load(parts, spec, "attn4", "dora", "all8")
    with pytest.raises(AdapterError, match="adapter 'dora' uses DoRA"):
        compose_adapters([(attn4, 1.0), (dora, 1.0)], "x")
    with pytest.raises(
        AdapterError,
        match=r"module 'model.layers.0.self_attn.[kqvo]_proj' needs rank 12 \(sum of the parts\), above max_lora_rank=8",
    ):
        compose_adapters([(attn4, 1.0), (all8, 1.0)], "x", max_rank=8)
    with pytest.raises(AdapterError, match="must be a finite number"):
        compose_adapters([(attn4, float("nan"))], "x")


@torch.inference_mode()
@pytest.mark.parametrize("name", ["attn4", "all8", "pat16", "dora"])
def test_merged_model_equals_unmerged_adapter(tiny_llama_dir, parts, spec, name):
    ids = torch.randint(3, 500, (2, 8), generator=torch.Generator().manual_seed(1))
    model = load_base(tiny_llama_dir)
    merge_adapter_into_model(model, load_peft_adapter(parts[name], name, spec, 64))
    assert max_rel_err(model(input_ids=ids).logits, peft_logits(tiny_llama_dir, parts[name], ids)) < TOL


def test_merging_lora_bias_needs_a_base_bias(tiny_llama_dir, parts, spec):
    with pytest.raises(
        AdapterError,
        match=r"cannot merge lora_bias into 'model.layers.0.self_attn.k_proj', whose base layer has no bias",
    ):
        model = load_base(tiny_llama_dir)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        merge_adapter_into_model(model, _load(parts, spec, "bias")[0])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # refused before any write


@torch.inference_mode()
def test_export_merged_checkpoint_loads_and_matches(tiny_qwen2_dir, tmp_path):
    """Qwen2 has q/k/v biases, so lora_bias merges; DoRA in the same adapter family is checked above."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = make_peft_adapter(
        tiny_qwen2_dir, tmp_path / "ad", r=8, target_modules=["q_proj", "v_proj"], lora_bias=True
    )
    out = export_merged(tiny_qwen2_dir, adapter, tmp_path / "out" / "merged")
    files = {p.name for p in out.iterdir()}
    assert {
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "loraplex_merge.json",
    } <= files
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp dir left behind
    ids = torch.randint(3, 500, (2, 9), generator=torch.Generator().manual_seed(2))
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert max_rel_err(merged(input_ids=ids).logits, peft_logits(tiny_qwen2_dir, adapter, ids)) < TOL
    assert AutoTokenizer.from_pretrained(out).decode([5, 6]) == AutoTokenizer.from_pretrained(
        tiny_qwen2_dir
    ).decode([5, 6])

    with pytest.raises(FileExistsError, match="not empty"):
        export_merged(tiny_qwen2_dir, adapter, out)
    other = make_peft_adapter(tiny_qwen2_dir, tmp_path / "other", r=4, seed=9)
    export_merged(tiny_qwen2_dir, other, out, overwrite=True)
    remerged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert max_rel_err(remerged(input_ids=ids).logits, peft_logits(tiny_qwen2_dir, other, ids)) < TOL


@torch.inference_mode()
def test_merge_conv1d_transposed_weights(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base_dir = tmp_path / "gpt2"
    GPT2LMHeadModel(
        GPT2Config(vocab_size=512, n_positions=64, n_embd=64, n_layer=2, n_head=4)
    ).save_pretrained(base_dir)
    ids = torch.randint(0, 512, (1, 6), generator=torch.Generator().manual_seed(3))
    for kw in (dict(r=8), dict(r=4, use_dora=True)):
        adapter = make_peft_adapter(
            base_dir, tmp_path / str(kw["r"]), target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, **kw
        )
        out = export_merged(base_dir, adapter, tmp_path / f"merged{kw['r']}")
        from transformers import AutoModelForCausalLM

        merged = AutoModelForCausalLM.from_pretrained(out).eval()
        assert max_rel_err(merged(input_ids=ids).logits, peft_logits(base_dir, adapter, ids)) < TOL, kw
