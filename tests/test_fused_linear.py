"""Fused q/k/v and gate/up projections: same outputs, same names, per-module weights still addressable."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from server.lora.merge import merge_adapter_into_model
from server.lora.spec import BaseModelSpec
from server.model.fused_linear import FusedMemberLinear, fuse_projections, fused_projection_of
from server.model.loader import load_model
from tests.lora_fixtures import ALL_LINEAR, load_base, make_peft_adapter, max_rel_err


@pytest.mark.parametrize("kind", ["llama", "qwen2"])  # qwen2: q/k/v biases
@torch.inference_mode()
def test_fused_layers_match_transformers(kind, tiny_llama_dir, tiny_qwen2_dir):
    model_dir = tiny_llama_dir if kind == "llama" else tiny_qwen2_dir
    ours = load_model(model_dir, "cpu", torch.float32)
    layer = ours.model.layers[0]
    assert isinstance(layer.self_attn.q_proj, FusedMemberLinear) and isinstance(layer.mlp.up_proj, nn.Linear)
    assert fused_projection_of(layer.self_attn.k_proj) is fused_projection_of(layer.self_attn.v_proj)
    x = torch.randn(1, 11, ours.config.hidden_size)
    ref_layer = load_base(model_dir).model.layers[0]
    for name in ("q_proj", "k_proj", "v_proj"):
        assert max_rel_err(getattr(layer.self_attn, name)(x), getattr(ref_layer.self_attn, name)(x)) < 1e-5
    assert max_rel_err(layer.mlp(x), ref_layer.mlp(x)) < 1e-5


def test_names_and_per_module_weights_are_kept(tiny_llama_dir):
    ours = load_model(tiny_llama_dir, "cpu", torch.float32)
    ref = load_base(tiny_llama_dir)
    assert ours.state_dict().keys() == ref.state_dict().keys()
    spec = BaseModelSpec.from_model(ours)
    assert spec.linears.keys() == BaseModelSpec.from_model(ref).linears.keys()
    for name in spec.linears:
        torch.testing.assert_close(spec.weight(name), BaseModelSpec.from_model(ref).weight(name))
    q = ours.model.layers[1].self_attn.q_proj
    fused = fused_projection_of(q)
    assert q.weight.data_ptr() == fused.weight.data_ptr()  # a view: writes reach the fused GEMM


@torch.inference_mode()
def test_identity_guard_recomputes_for_other_inputs_and_repeat_calls(tiny_llama_dir):
    attn = load_model(tiny_llama_dir, "cpu", torch.float32).model.layers[0].self_attn
    ref = load_base(tiny_llama_dir).model.layers[0].self_attn
    x1, x2 = torch.randn(5, 64), torch.randn(5, 64)
    torch.testing.assert_close(attn.q_proj(x1), ref.q_proj(x1))
    torch.testing.assert_close(attn.k_proj(x2), ref.k_proj(x2))  # another tensor: recomputed
    torch.testing.assert_close(attn.k_proj(x2), ref.k_proj(x2))  # the same member twice: recomputed
    torch.testing.assert_close(attn.v_proj(x2), ref.v_proj(x2))
    torch.testing.assert_close(attn.v_proj(x1), ref.v_proj(x1))


def test_groups_need_plain_linears_of_one_input_size():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.k_proj, self.v_proj = nn.Linear(8, 8), nn.Linear(4, 8), nn.Linear(8, 8)
            self.gate_proj, self.up_proj = nn.Linear(8, 16), nn.Linear(8, 16, bias=False)

    model = Odd()
    assert fuse_projections(model) == [] and type(model.q_proj) is nn.Linear


@torch.inference_mode()
def test_merge_writes_through_to_the_fused_gemm(tiny_llama_dir, tmp_path):
    from server.lora.adapter import load_peft_adapter

    adapter_dir = make_peft_adapter(tiny_llama_dir, tmp_path / "a", r=4, target_modules=ALL_LINEAR, seed=3)
    plain, ours = load_base(tiny_llama_dir), load_model(tiny_llama_dir, "cpu", torch.float32)
    for model in (plain, ours):
        spec = BaseModelSpec.from_model(model)
        merge_adapter_into_model(model, load_peft_adapter(adapter_dir, "a", spec, 64))
    x = torch.randn(3, 64)
    for name in ("q_proj", "k_proj", "v_proj"):
        got = getattr(ours.model.layers[0].self_attn, name)(x)
        torch.testing.assert_close(
            got, getattr(plain.model.layers[0].self_attn, name)(x), rtol=1e-5, atol=1e-5
        )
    torch.testing.assert_close(
        ours.model.layers[1].mlp(x), plain.model.layers[1].mlp(x), rtol=1e-5, atol=1e-5
    )
