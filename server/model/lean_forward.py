"""A lean forward for Llama-shaped decoders on CPU: the Hugging Face forward's modules and math,
without its per-layer Python.

Why: with the GEMMs, attention, norms and argmax in native kernels, what was left of a batch-32
decode step (bench model, 8 layers, ~10 ms) was mostly the HF modules' own Python: decorators,
keyword plumbing, per-layer mask and cache arguments, RoPE as a dozen tensor ops. This forward calls
the same submodules (so fused q/k/v and gate/up GEMMs, LoRA deltas and native norms all still
apply) straight from one loop, rotates q and k with one native op that computes exactly HF's
``x * cos + rotate_half(x) * sin``, and in fp32 runs SiLU(gate) * up as one op
(``server.model.decoder_ops``). Measured in one process, alternating: decode steps ~7 % faster
with HF's RoPE, more with the native one (see docs/benchmarks.md).

Which models: ``model_type`` llama, mistral or qwen2 (one decoder structure: Qwen2's q/k/v biases
live in the projection modules; the sliding window comes from where each HF attention reads it),
and only when every layer has the modules and attributes this loop uses. Anything else, and any
input the native op does not take, runs the HF forward. Tests compare logits and greedy tokens
with the HF forward (``tests/test_lean_forward.py``).
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from transformers.modeling_utils import slice_logits_to_keep

from server.model.cpu_linear import LinearKernel, PackedLinear
from server.model.decoder_ops import decoder_ops_available, rope_, silu_mul
from server.model.fused_linear import fused_projection_of

try:
    from transformers.activations import SiLUActivation  # what ACT2FN["silu"] builds in transformers 5
except ImportError:  # pragma: no cover
    SiLUActivation = nn.SiLU
SILU_TYPES = (nn.SiLU, SiLUActivation)

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
_LAYER_PARTS = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")
_ATTENTION_PARTS = ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling", "layer_idx")
_MLP_PARTS = ("gate_proj", "up_proj", "down_proj", "act_fn")


def _sliding_window(attention: nn.Module, config) -> int | None:
    """What the HF attention of this model type passes as ``sliding_window``."""
    if config.model_type == "qwen2":
        return attention.sliding_window
    if config.model_type == "mistral":
        return getattr(config, "sliding_window", None)
    return None


class LeanForward:
    """``(input_ids [1, T], position_ids [1, T], attention backend, logits_to_keep) -> logits``,
    as ``model(...).logits[0]`` would return them."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        decoder = model.model
        config = model.config
        self.embed, self.rotary, self.norm = decoder.embed_tokens, decoder.rotary_emb, decoder.norm
        self.layers = [
            (layer.input_layernorm, layer.self_attn, layer.post_attention_layernorm, layer.mlp,
             _sliding_window(layer.self_attn, config))
            for layer in decoder.layers[: config.num_hidden_layers]
        ]  # fmt: skip
        weight = next(model.parameters())
        self.native = weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.bfloat16)
        self.native = self.native and decoder_ops_available()
        # SiLU(gate) * up in one op: fp32 only (the op's exp agrees with torch's to float rounding,
        # and a bf16 result rounded from a value one fp32 ulp off could differ from HF's)
        self.native_silu = self.native and weight.dtype == torch.float32
        self._chain_linears(model)

    def _chain_linears(self, model: nn.Module) -> None:
        """Tells each packed linear which one this loop runs next (q/k/v, o, gate/up, down, the next
        layer's q/k/v, ..., lm_head), so its GEMM's last panels prefetch the next one's first while the
        norm, RoPE or attention in between run. Measured: see docs/benchmarks.md."""
        order = [
            p
            for _, attn, _, mlp, _ in self.layers
            for p in (attn.q_proj, attn.o_proj, mlp.gate_proj, mlp.down_proj)
        ]
        kernels = [_kernel_of(m) for m in (*order, model.lm_head)]
        for current, following in zip(kernels, kernels[1:], strict=False):
            if current is not None and following is not None:
                current.next = following

    def __call__(self, input_ids, position_ids, attention, keep) -> torch.Tensor:
        h = self.embed(input_ids)  # [1, T, hidden]
        cos, sin = self.rotary(h, position_ids)  # [1, T, head_dim]
        tokens = input_ids.shape[1]
        for norm_in, attn, norm_post, mlp, window in self.layers:
            x = norm_in(h)
            q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
            q, k = self._rope(q, k, cos, sin, tokens, attn.head_dim)  # [1, H, T, D] views
            v = v.view(1, tokens, -1, attn.head_dim).transpose(1, 2)
            o = attention.forward(attn.layer_idx, q, k, v, attn.scaling, window, None)
            h = h + attn.o_proj(o.reshape(1, tokens, -1))
            x = norm_post(h)
            h = h + mlp.down_proj(self._activation(mlp, x))
        h = self.norm(h)
        return self.model.lm_head(slice_logits_to_keep(h, keep))[0]

    def _activation(self, mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
        gate, up = mlp.gate_proj(x), mlp.up_proj(x)
        if self.native_silu and type(mlp.act_fn) in SILU_TYPES and gate.dtype == torch.float32:
            shape = gate.shape
            return silu_mul(gate.reshape(-1, shape[-1]), up.reshape(-1, shape[-1])).view(shape)
        return mlp.act_fn(gate) * up

    def _rope(self, q, k, cos, sin, tokens: int, head_dim: int):
        q = q.view(1, tokens, -1, head_dim)
        k = k.view(1, tokens, -1, head_dim)
        if self.native and q.dtype == cos.dtype and q.stride(-1) == 1 and k.stride(-1) == 1:
            # the projections' outputs are fresh tensors (column views of the fused GEMM's output):
            # rotating them in place changes nothing another caller could still read
            rope_(q[0], k[0], cos[0], sin[0])
            return q.transpose(1, 2), k.transpose(1, 2)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        c, s = cos.unsqueeze(1), sin.unsqueeze(1)
        return q * c + _rotate_half(q) * s, k * c + _rotate_half(k) * s


def _kernel_of(module: nn.Module) -> LinearKernel | None:
    """The packed kernel that runs ``module``'s GEMM (through a LoRA wrapper, for a fused group)."""
    if getattr(module, "is_lora_wrapper", False):
        module = module.base_layer
    fused = fused_projection_of(module)
    if fused is not None:
        return fused.kernel
    return module.kernel if isinstance(module, PackedLinear) else None


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def lean_forward_for(model: nn.Module) -> LeanForward | None:
    """A ``LeanForward`` for ``model`` when it is a supported Llama-shaped decoder on the CPU, else None."""
    config = getattr(model, "config", None)
    decoder = getattr(model, "model", None)
    if (
        config is None
        or decoder is None
        or getattr(config, "model_type", None) not in SUPPORTED_MODEL_TYPES
        or next(model.parameters()).device.type != "cpu"
        or getattr(config, "pretraining_tp", 1) != 1
        or not all(hasattr(decoder, n) for n in ("embed_tokens", "rotary_emb", "norm", "layers"))
        or not hasattr(model, "lm_head")
    ):
        return None
    for layer in decoder.layers:
        if not all(hasattr(layer, n) for n in _LAYER_PARTS):
            return None
        if not all(hasattr(layer.self_attn, n) for n in _ATTENTION_PARTS):
            return None
        if not all(hasattr(layer.mlp, n) for n in _MLP_PARTS):
            return None
    log.info("lean forward for %s (%d layers)", config.model_type, config.num_hidden_layers)
    return LeanForward(model)
