"""The lean forward (server/model/lean_forward.py) against the Hugging Face forward it replaces:
same greedy tokens as transformers' generate, the same logits as the engine's HF path, per model type
(Llama, Qwen2 with q/k/v biases, Mistral with a sliding window shorter than the prompts), in fp32 and
bf16; the native RoPE op against HF's formula; models it does not know keep the HF forward."""

from __future__ import annotations

import pytest
import torch
from transformers import MistralConfig
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from server.engine.sequence import Sequence
from server.model.decoder_ops import decoder_ops_available, silu_mul
from server.model.lean_forward import lean_forward_for
from server.model.synthetic import byte_bpe_tokenizer, make_random_model
from tests.engine_utils import build_engine, greedy, random_prompts, reference_greedy, run_queued
from tests.model_factory import make_tiny_model


@pytest.fixture(scope="module")
def tiny_mistral_dir(tmp_path_factory):
    config = MistralConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                           sliding_window=6, tie_word_embeddings=False)  # fmt: skip
    return make_random_model(
        tmp_path_factory.mktemp("tiny_mistral"), config, byte_bpe_tokenizer(512), 0, 0.08
    )


def _run(engine, prompts, tokens=6, lean=True):
    runner = engine.core.runner
    saved = runner.lean
    if not lean:
        runner.lean = None
    logits = []
    original = runner.run

    def recording(seqs):
        out = original(seqs)
        logits.append(out.clone())
        return out

    runner.run = recording
    try:
        seqs = [Sequence(f"r{i}", p, greedy(tokens)) for i, p in enumerate(prompts)]
        outputs = run_queued(engine.core, seqs).outputs
    finally:
        runner.run = original
        runner.lean = saved
    return [outputs[f"r{i}"] for i in range(len(prompts))], logits


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
def test_same_tokens_and_logits_as_the_hf_forward(kind, tiny_llama_dir, tiny_qwen2_dir, tiny_mistral_dir):
    model_dir = {"llama": tiny_llama_dir, "qwen2": tiny_qwen2_dir, "mistral": tiny_mistral_dir}[kind]
    engine = build_engine(model_dir, device="cpu", dtype="float32")
    assert engine.core.runner.lean is not None
    prompts = random_prompts([9, 3, 14])
    lean_tokens, lean_logits = _run(engine, prompts)
    hf_tokens, hf_logits = _run(engine, prompts, lean=False)
    assert lean_tokens == hf_tokens == reference_greedy(model_dir, prompts, 6)
    assert len(lean_logits) == len(hf_logits)
    for a, b in zip(lean_logits, hf_logits, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_bf16_matches_the_hf_forward(tiny_llama_dir):
    engine = build_engine(tiny_llama_dir, device="cpu", dtype="bfloat16")
    prompts = random_prompts([7, 12])
    lean_tokens, lean_logits = _run(engine, prompts)
    hf_tokens, hf_logits = _run(engine, prompts, lean=False)
    assert lean_tokens == hf_tokens
    for a, b in zip(lean_logits, hf_logits, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # the same bf16 roundings, op for op


@pytest.mark.skipif(not decoder_ops_available(), reason="the kernel could not be built here")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_rope_is_hf_apply_rotary_pos_emb_exactly(dtype):
    torch.manual_seed(0)
    tokens, heads, kv_heads, dim = 5, 4, 2, 32
    q = (torch.randn(tokens, heads, dim) * 3).to(dtype)
    k = (torch.randn(tokens, kv_heads, dim) * 3).to(dtype)
    angles = torch.randn(tokens, dim // 2) * 4
    cos, sin = torch.cat([angles.cos()] * 2, -1).to(dtype), torch.cat([angles.sin()] * 2, -1).to(dtype)
    want_q, want_k = apply_rotary_pos_emb(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos[None], sin[None]
    )
    got_q, got_k = q.clone(), k.clone()
    torch.ops.loraplex_decoder_cpu.rope(got_q, got_k, cos, sin)
    assert torch.equal(got_q, want_q[0].transpose(0, 1)) and torch.equal(got_k, want_k[0].transpose(0, 1))


@pytest.mark.skipif(not decoder_ops_available(), reason="the kernel could not be built here")
@pytest.mark.parametrize("width", [5, 16, 37, 1376])
def test_silu_mul_is_torch_silu_times_up(width):
    torch.manual_seed(width)
    fused = torch.randn(9, 2 * width) * 6
    fused[0, :3] = torch.tensor([-120.0, 95.0, 0.0])[: min(3, width)]  # past exp's range both ways
    gate, up = fused[:, :width], fused[:, width:]  # column views, rows 2 * width apart
    torch.testing.assert_close(silu_mul(gate, up), torch.nn.functional.silu(gate) * up, rtol=2e-6, atol=1e-6)


def test_other_model_types_keep_the_hf_forward(tmp_path):
    from transformers import AutoModelForCausalLM

    model_dir = make_tiny_model(tmp_path / "m", "llama")
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.config.model_type = "gemma"
    assert lean_forward_for(model) is None


def test_each_packed_linear_knows_the_next_one(tiny_llama_dir):
    """The prefetch hint chain follows the loop's order: q/k/v, o, gate/up, down, ..., lm_head."""
    from server.model.lean_forward import _kernel_of

    engine = build_engine(tiny_llama_dir, device="cpu", dtype="float32")
    model = engine.core.runner.model
    order = [p for layer in model.model.layers for p in (layer.self_attn.q_proj, layer.self_attn.o_proj,
                                                          layer.mlp.gate_proj, layer.mlp.down_proj)]  # fmt: skip
    kernels = [_kernel_of(m) for m in (*order, model.lm_head)]
    assert all(k is not None for k in kernels)
    assert [k.next for k in kernels[:-1]] == kernels[1:] and kernels[-1].next is None
