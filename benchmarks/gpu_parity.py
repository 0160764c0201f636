"""GPU correctness parts of ``make gpu-check``: kernel parity (a), engine vs HF+PEFT (b), graphs (c).

Errors are ``||fast - ref|| / ||ref||`` against fp32 references on upcast inputs (bf16 operands land
between 1e-3 and 1e-2); a kernel passes under 2e-2. The engine check runs the embedded demo model
(trained, so its next-token distributions are peaked and bf16 rounding rarely flips a greedy
choice), its three trained demo adapters and five random ones, in one mixed batch with base rows.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import torch

from benchmarks.random_adapters import write_random_adapter

REPO = Path(__file__).resolve().parent.parent
KERNEL_TOL = 2e-2


def _rel(fast: torch.Tensor, ref: torch.Tensor) -> float:
    return float((fast.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))


# --- (a) kernels ---------------------------------------------------------------------------------
ATTENTION_CASES = [  # (name, [(cached prefix, new tokens)], window, softcap)
    ("prefill ragged, GQA 32/8, cached prefixes", [(0, 100), (37, 64), (0, 1), (500, 33), (0, 17)], None, None),
    ("decode ragged, GQA 32/8, up to 2047 context", [(0, 1), (16, 1), (299, 1), (1023, 1), (2046, 1)], None, None),
    ("prefill, window 128 + soft-cap 30", [(200, 50), (0, 300)], 128, 30.0),
    ("decode, window 128 + soft-cap 30", [(5, 1), (700, 1), (1500, 1)], 128, 30.0),
]  # fmt: skip


def _attention_case(plan, backend_cls, lengths, window, softcap, block=16):
    """bf16 backend vs the torch backend in fp32 over the same (fragmented) cache; returns errors."""
    from server.model.attention import SeqSpan, StepLayout
    from server.model.attention.torch_paged import TorchPagedAttention
    from server.model.geometry import ModelGeometry

    heads, kv_heads, dim = plan.attention_heads
    geometry = ModelGeometry(1, kv_heads, dim, 8192, 100, heads)
    need = sum(-(-(p + n) // block) for p, n in lengths)
    fast = backend_cls(geometry, need + 8, block, plan.dtype, plan.device)
    ref = TorchPagedAttention(geometry, need + 8, block, torch.float32, plan.device)
    fast.kv_caches[0].normal_()
    ref.kv_caches[0].copy_(fast.kv_caches[0].float())
    order = list(range(need))
    random.Random(0).shuffle(order)  # fragmented block tables
    spans, row = [], 0
    for prefix, new in lengths:
        blocks = -(-(prefix + new) // block)
        spans.append(SeqSpan(row, new, prefix + new, [order.pop() for _ in range(blocks)]))
        row += new
    q = torch.randn(1, row, heads, dim, device=plan.device, dtype=plan.dtype).transpose(1, 2)
    k, v = (
        torch.randn(1, row, kv_heads, dim, device=plan.device, dtype=plan.dtype).transpose(1, 2)
        for _ in range(2)
    )
    outs = []
    for backend, cast in ((fast, plan.dtype), (ref, torch.float32)):
        backend.plan(StepLayout.from_spans(spans, block, plan.device))
        outs.append(backend.forward(0, q.to(cast), k.to(cast), v.to(cast), dim**-0.5, window, softcap))
    plan.sync()
    cache_equal = torch.equal(fast.kv_caches[0].float(), ref.kv_caches[0])
    result = {"rel_err": _rel(outs[0], outs[1]), "cache_equal": bool(cache_equal)}
    if all(n == 1 for _, n in lengths) and backend_cls.supports_cuda_graphs:  # the graph-bucket launch
        fast.plan(StepLayout.from_spans(spans, block, plan.device, static=True, max_blocks=512))
        static = fast.forward(0, q, k, v, dim**-0.5, window, softcap)
        result["static_bit_identical"] = bool(torch.equal(static, outs[0]))
    return result


LORA_CASES = [  # (name, in, out, slots of the sequences, tokens per sequence)
    ("decode 64 rows, 8 adapters, 4096->4096", 4096, 4096, [i % 8 for i in range(64)], [1] * 64),
    ("decode 64 rows, 64 adapters, 4096->14336", 4096, 14336, list(range(64)), [1] * 64),
    ("prefill segments with base rows, 14336->4096", 14336, 4096, [0, -1, 3, 3], [300, 50, 700, 9]),
]  # fmt: skip


def _lora_case(plan, d_in, d_out, seq_slots, seq_lens, rank=16):
    from server.lora.batch import LoRABatch
    from server.lora.ops.sgmv_torch import sgmv_torch
    from server.lora.ops.sgmv_triton import sgmv_triton
    from server.lora.slot_weights import SlotWeights

    slots, kw = max(seq_slots) + 1, {"device": plan.device, "dtype": plan.dtype}
    weights = SlotWeights(["m"], d_in, [d_out], slots, rank, plan.device, plan.dtype)
    with torch.no_grad():
        weights.a.normal_(0, 0.02)  # [pages, in, 1, 16]: every rank live (slot s owns its own pages)
        weights.b.normal_(0, 0.02)
        weights.a[weights.table.zero_page].zero_()
        weights.b[weights.table.zero_page].zero_()
    weights.rank = [[rank] * slots]
    reference = SlotWeights(["m"], d_in, [d_out], slots, rank, plan.device, torch.float32)
    with torch.no_grad():
        reference.a.copy_(weights.a)
        reference.b.copy_(weights.b)
    reference.rank = weights.rank
    n = sum(seq_lens)
    x = torch.randn(n, d_in, **kw)
    y0 = torch.randn(n, d_out, **kw)
    result = {}
    for static in (False, True) if all(t == 1 for t in seq_lens) else (False,):
        batch = LoRABatch(slots)
        batch.set(seq_slots, seq_lens, static=static)
        want, got = y0.float().clone(), y0.clone()
        sgmv_torch(want, x.float(), reference, batch.slot_rows(x.device))
        sgmv_triton(got, x, weights.a[:, :, 0], weights.b, weights.page_table, rank, batch)
        plan.sync()
        result["static_rel_err" if static else "rel_err"] = _rel(got.float() - y0.float(), want - y0.float())
    return result


def kernel_parity(plan, deadline) -> tuple[dict, list[str]]:
    from server.model.attention import available
    from server.model.attention.triton_paged import TritonPagedAttention

    backends = {"triton": TritonPagedAttention}
    if available("flashinfer", plan.device) is None:
        from server.model.attention.flashinfer_paged import FlashInferPagedAttention

        backends["flashinfer"] = FlashInferPagedAttention
    rows, results, scale = [], {}, plan.kernel_scale
    for backend_name, cls in backends.items():
        for name, lengths, window, softcap in ATTENTION_CASES:
            if deadline.expired():
                break
            lengths = [(p // scale, max(1, n // scale) if n > 1 else 1) for p, n in lengths]
            r = _attention_case(plan, cls, lengths, window and window // scale, softcap)
            results[f"attention/{backend_name}/{name}"] = r
            rows.append((f"attention {backend_name}: {name}", r))
    for name, d_in, d_out, slots, lens in LORA_CASES:
        if deadline.expired():
            break
        lens = [max(1, n // scale) if n > 1 else 1 for n in lens]
        r = results[f"lora/triton/{name}"] = _lora_case(
            plan, d_in // scale, d_out // scale, slots, lens, plan.rank
        )
        rows.append((f"LoRA SGMV triton: {name}", r))
    ok = all(v < KERNEL_TOL for r in results.values() for k, v in r.items() if k.endswith("rel_err"))
    ok = ok and all(v for r in results.values() for k, v in r.items() if isinstance(v, bool))
    results["pass"] = ok and bool(rows)
    md = ["## (a) Kernel parity, bf16 vs fp32 torch reference", "",
          f"Pass: **{results['pass']}** (relative error < {KERNEL_TOL}, caches equal, static launches bit-identical)",
          "", "| case | results |", "|---|---|"]  # fmt: skip
    md += [f"| {name} | " + ", ".join(f"{k}={_fmt(v)}" for k, v in r.items()) + " |" for name, r in rows]
    return results, md


def _fmt(v) -> str:
    return f"{v:.2e}" if isinstance(v, float) else str(v)


# --- (b) engine vs HF+PEFT, (c) graphs on vs off -------------------------------------------------
PROMPTS = [
    "def fibonacci(n):", "The court held that the contract", "HELLO THERE, HOW", "import numpy as np\n",
    "In the matter of", "class Stack:\n    def", "The defendant argued", "WHAT IS THE", "for i in range(",
    "Once upon a time",
]  # fmt: skip


def _store(tmp: Path, config) -> list[str]:
    """The three trained demo adapters and five random ones (rank 8, all projections)."""
    store = tmp / "parity-store"
    names = []
    for src in sorted((REPO / "adapters_store").iterdir()):
        if (src / "adapter_config.json").exists():
            shutil.copytree(src, store / src.name, dirs_exist_ok=True)
            names.append(src.name)
    for i in range(8 - len(names)):
        write_random_adapter(store / f"random-{i}", config, rank=8, seed=100 + i, std=0.03)
        names.append(f"random-{i}")
    return names


def _ours(plan, store: Path, requests, enforce_eager: bool):
    """Our engine on the demo model: every request added at once, one mixed batch; tokens and the
    logits each token was sampled from, per request."""
    from server.bootstrap import build_runtime
    from server.config import Settings
    from server.engine.sequence import Sequence
    from server.engine.types import SamplingParams

    dtype = str(plan.dtype).removeprefix("torch.")
    rt = build_runtime(Settings(model=REPO / "models" / "demo", adapter_store=store, device=plan.device, dtype=dtype,
                                max_loras=8, max_num_seqs=16, enforce_eager=enforce_eager,
                                attention_backend=plan.attention_backend, lora_backend=plan.lora_backend))  # fmt: skip
    for name, _ in requests:
        if name:
            rt.lora.cache.get(name)  # loaded before the first step: both runs schedule identical batches
    core, logits = rt.engine.core, {}
    inner = core.sampler

    def recording(batch_logits, seqs):
        for row, seq in enumerate(seqs):
            logits.setdefault(seq.request_id, []).append(batch_logits[row].float().cpu())
        return inner(batch_logits, seqs)

    core.sampler = recording
    params = SamplingParams(max_tokens=plan.parity_steps, temperature=0.0, ignore_eos=True)
    tokens = {}
    for i, (name, ids) in enumerate(requests):
        core.add(Sequence(f"r{i}", ids, params, rt.adapters.resolve(name) if name else None))
    while core.has_work():
        for seq, out in core.step():
            tokens.setdefault(seq.request_id, []).extend(out.new_token_ids)
    graphs = core.runner.graphs
    info = {"replay": graphs.strategy.name if graphs and graphs.active else getattr(graphs, "disabled_reason", None),
            "attention": core.runner.attention.name, "lora": rt.lora.model.backend.name}  # fmt: skip
    rt.close()
    return tokens, {k: torch.stack(v) for k, v in logits.items()}, info


def _peft_reference(plan, store: Path, names: list[str]):
    """HF+PEFT on the same device and dtype: per request, greedy tokens and the logits along a sequence."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = (
        AutoModelForCausalLM.from_pretrained(REPO / "models" / "demo", dtype=plan.dtype)
        .to(plan.device)
        .eval()
    )
    base.generation_config.eos_token_id = None
    model = PeftModel.from_pretrained(base, store / names[0], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(store / name, adapter_name=name)
    model.eval()

    def run(name, ids, ours=None):
        from contextlib import nullcontext

        if name:
            model.set_adapter(name)
        with torch.inference_mode(), model.disable_adapter() if name is None else nullcontext():
            prompt = torch.tensor([ids], device=plan.device)
            out = model.generate(prompt, max_new_tokens=plan.parity_steps, do_sample=False, pad_token_id=0)
            seq = out if ours is None else torch.tensor([ids + ours], device=plan.device)
            logits = model(input_ids=seq[:, :-1]).logits[0, len(ids) - 1 :].float().cpu()
        return out[0, len(ids) :].tolist(), logits

    return run


def _compare(ref_tokens, ref_logits_on_ours, ours, our_logits) -> dict:
    """Exact-match length; logits error on the shared prefix; every one of our tokens checked against
    HF+PEFT's logits along our own sequence (a different choice must be a bf16 near-tie)."""
    same = next((i for i, (a, b) in enumerate(zip(ref_tokens, ours, strict=False)) if a != b), len(ours))
    scale = ref_logits_on_ours.abs().max().item()
    err = (our_logits[:same] - ref_logits_on_ours[:same]).abs().max().item() if same else 0.0
    chosen = ref_logits_on_ours.gather(1, torch.tensor(ours)[:, None])[:, 0]
    gaps = (ref_logits_on_ours.max(1).values - chosen).tolist()
    return {"exact_steps": same, "max_logit_err": err, "logit_scale": scale,
            "max_gap_of_our_choice": max(gaps), "consistent": max(gaps) <= 0.02 * scale}  # fmt: skip


def engine_checks(plan, tmp: Path, deadline) -> tuple[dict, list[str]]:
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(REPO / "models" / "demo")
    tokenizer = AutoTokenizer.from_pretrained(REPO / "models" / "demo")
    names = _store(tmp, config)
    requests = [(([*names, None, None])[i], tokenizer(p)["input_ids"]) for i, p in enumerate(PROMPTS)]
    graphs_tokens, graphs_logits, info = _ours(plan, tmp / "parity-store", requests, enforce_eager=False)
    eager_tokens, eager_logits, eager_info = _ours(plan, tmp / "parity-store", requests, enforce_eager=True)
    reference = _peft_reference(plan, tmp / "parity-store", names)
    per_request = {}
    for i, (name, ids) in enumerate(requests):
        key = f"r{i}"
        ref_tokens, _ = reference(name, ids)
        _, along_ours = reference(name, ids, graphs_tokens[key])
        per_request[f"{key} ({name or 'base'})"] = _compare(
            ref_tokens, along_ours, graphs_tokens[key], graphs_logits[key]
        )
    graphs_same = graphs_tokens == eager_tokens
    logits_same = all(torch.equal(graphs_logits[k], eager_logits[k]) for k in graphs_logits)
    b_pass = all(r["exact_steps"] >= plan.parity_steps for r in per_request.values())
    result = {"engine": info, "eager_engine": eager_info, "per_request": per_request, "peft_exact_pass": b_pass,
              "peft_consistent": all(r["consistent"] for r in per_request.values()),
              "graphs_vs_eager_tokens_identical": graphs_same, "graphs_vs_eager_logits_identical": logits_same}  # fmt: skip
    md = ["## (b) Engine vs HF+PEFT (bf16, GPU), 8 adapters + base rows in one mixed batch", "",
          f"Engine: {info}. Target: {plan.parity_steps} greedy steps equal on every request: **{b_pass}**; every token "
          f"of ours is HF+PEFT's argmax or within 2% of the logit scale of it: **{result['peft_consistent']}**.", "",
          "| request | exact steps | max logit err (shared prefix) | logit scale | max gap of our choice |",
          "|---|---:|---:|---:|---:|"]  # fmt: skip
    md += [f"| {k} | {r['exact_steps']} | {r['max_logit_err']:.3f} | {r['logit_scale']:.1f} | "
           f"{r['max_gap_of_our_choice']:.3f} |" for k, r in per_request.items()]  # fmt: skip
    md += ["", "## (c) CUDA graphs on vs off", "",
           f"graphs: {info['replay']}, eager: {eager_info['replay']}; tokens identical: **{graphs_same}**, "
           f"logits bit-identical: **{logits_same}**"]  # fmt: skip
    return result, md
