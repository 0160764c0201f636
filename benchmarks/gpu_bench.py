"""The GPU benchmark part of ``make gpu-check`` (d): real shapes, random weights, built on the GPU.

Per shape: the model is built on the GPU in bf16 (never on disk), 64 random rank-16 adapters on all
seven projections are written as PEFT safetensors, then

* baselines first, on that same model object with transformers' SDPA attention: ``generate`` (base)
  and PEFT's mixed-adapter ``generate`` (8 adapters), decode step time as the difference between a
  1-token and a 17-token generate, CUDA-synchronized around every timer;
* then the same model is routed to our attention and served: decode steps are timed on running
  batches seeded at a given context (their KV blocks allocated and filled with random values, so no
  prefill is spent), for base-only, 8 and 64 distinct adapters; TTFT is a fresh prompt's first token.

Roofline: a decode step must read every weight once (the embedding only for its rows), each
sequence's K/V, and the A/B of every distinct adapter in the batch; that many bytes over the step
time over the peak HBM bandwidth is the fraction reported.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from benchmarks.random_adapters import adapter_bytes, write_random_adapter


def hf_decode_step(plan, model, batch: int, ctx: int, vocab: int, new: int = 16, **extra) -> float:
    """Seconds per decode step of ``model.generate`` (transformers or PEFT) at ``batch`` x ``ctx``."""
    ids = torch.randint(3, vocab, (batch, ctx), device=plan.device)
    mask = torch.ones_like(ids)

    def generate(n, rows=batch, length=ctx):
        kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        with torch.inference_mode():
            model.generate(input_ids=ids[:rows, :length], attention_mask=mask[:rows, :length], **kw, **extra)

    generate(2, length=min(ctx, 64))  # warm-up: kernels loaded, caches made
    one = plan.timed(lambda: generate(1))
    many = plan.timed(lambda: generate(new + 1))
    return (many - one) / new


def baselines(plan, model, config, store: Path, names: list[str], deadline) -> dict:
    """transformers generate and PEFT mixed (8 adapters, kept in the model dtype) on the model as built
    (SDPA attention); each system gets a share of the part's time box."""
    from peft import PeftModel

    mixed = names[:8]
    peft_key = f"peft_mixed_{len(mixed)}"
    out = {"transformers": {}, peft_key: {}}
    for ctx, batch in plan.baseline_points:
        if deadline.left() < 0.7 * deadline.budget:
            break
        out["transformers"][f"b{batch}_c{ctx}"] = hf_decode_step(plan, model, batch, ctx, config.vocab_size)
    kw = {"autocast_adapter_dtype": False}  # PEFT would otherwise run bf16 adapters in fp32
    peft = PeftModel.from_pretrained(model, store / mixed[0], adapter_name=mixed[0], **kw)
    for name in mixed[1:]:
        peft.load_adapter(store / name, adapter_name=name, **kw)
    for ctx, batch in plan.baseline_points:
        if deadline.left() < 0.55 * deadline.budget:
            break
        rows = [mixed[i % len(mixed)] for i in range(batch)]
        out[peft_key][f"b{batch}_c{ctx}"] = hf_decode_step(
            plan, peft, batch, ctx, config.vocab_size, adapter_names=rows
        )
    peft.unload()  # the LoRA modules go; the base model object stays for our runtime
    return out


def _runtime(plan, model, config, store: Path, shape: str):
    from server.bootstrap import build_runtime
    from server.config import Settings
    from server.model.attention.hf_bridge import register_attention_interface
    from server.model.synthetic import use_attention, word_tokenizer

    use_attention(model, register_attention_interface())
    most = max(plan.adapter_counts)
    settings = Settings(served_model_name=shape, device=plan.device, dtype=str(plan.dtype).removeprefix("torch."),
                        adapter_store=store, max_loras=most, max_lora_rank=plan.rank, max_cpu_loras=most,
                        max_num_seqs=max(plan.batches), max_num_batched_tokens=max(2048, max(plan.contexts)),
                        max_model_len=max(plan.contexts) + 256, attention_backend=plan.attention_backend,
                        lora_backend=plan.lora_backend)  # fmt: skip
    rt = build_runtime(settings, model=model, tokenizer=word_tokenizer(config.vocab_size))
    for cache in rt.engine.core.runner.attention.kv_caches:
        cache.normal_()  # never time attention on zeros
    return rt


def _seed(core, batch: int, ctx: int, adapters: list, max_tokens: int, vocab: int):
    """``batch`` running sequences whose first ``ctx - 1`` tokens count as cached (blocks allocated)."""
    from server.engine.sequence import Sequence
    from server.engine.types import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    seqs = []
    for i in range(batch):
        ids = torch.randint(3, vocab, (ctx,)).tolist()
        seq = Sequence(f"b{batch}-c{ctx}-{i}", ids, params, adapters[i % len(adapters)] if adapters else None)
        core.block_manager.allocate(seq, ctx)
        seq.num_computed_tokens = ctx - 1
        core.add(seq)
        seqs.append(seq)
    return seqs


def decode_point(plan, rt, batch: int, ctx: int, adapters: list, vocab: int) -> float:
    """Median seconds of one engine step (scheduler, forward, sampling; it ends on the sampler's sync)."""
    core, warmup = rt.engine.core, plan.bench_warmup
    seqs = _seed(core, batch, ctx, adapters, warmup + plan.bench_steps + 2, vocab)
    times = []
    for i in range(warmup + plan.bench_steps):
        start = time.perf_counter()
        core.step()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    for seq in seqs:
        core.abort(seq.request_id)
    return statistics.median(times)


def ttft(rt, ctx: int, vocab: int, repeats: int = 3) -> float:
    """Median seconds from adding a ``ctx``-token prompt to its first token, on an idle engine."""
    from server.engine.sequence import Sequence
    from server.engine.types import SamplingParams

    core, times = rt.engine.core, []
    for r in range(repeats + 1):
        seq = Sequence(
            f"ttft-{ctx}-{r}", torch.randint(3, vocab, (ctx,)).tolist(), SamplingParams(max_tokens=1)
        )
        start = time.perf_counter()
        core.add(seq)
        while not seq.is_finished:
            core.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def step_bytes(model, config, batch: int, ctx: int, distinct: int, rank: int) -> dict:
    params = {id(p): p for p in model.parameters()}.values()
    weights = sum(p.numel() * p.element_size() for p in params)
    if not config.tie_word_embeddings:  # the embedding table is read only for the batch's rows
        weights -= model.get_input_embeddings().weight.numel() * 2
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv = batch * ctx * config.num_hidden_layers * 2 * config.num_key_value_heads * head_dim * 2
    return {"weights": weights, "kv": kv, "lora": distinct * adapter_bytes(config, rank)}


def bench_shape(plan, part: str, tmp: Path, deadline, env: dict) -> tuple[dict, list[str]]:
    from server.model.synthetic import build_random_model, model_config

    deadline.budget = deadline.left()
    preset, overrides = plan.shapes[part]
    config = model_config("llama", preset, **overrides)
    model = build_random_model(config, plan.device, plan.dtype, seed=0)
    store = tmp / f"store-{part}"
    names = [write_random_adapter(store / f"r{plan.rank}-{i}", config, plan.rank, seed=i, dtype=plan.dtype,
                                  device=plan.device).name for i in range(max(plan.adapter_counts))]  # fmt: skip
    result = {"shape": f"{preset} {overrides or ''}".strip(), "params_b": sum(p.numel() for p in model.parameters()) / 1e9,
              "rank": plan.rank, "baselines": baselines(plan, model, config, store, names, deadline)}  # fmt: skip
    rt = _runtime(plan, model, config, store, preset)
    refs = {name: rt.adapters.resolve(name) for name in names}
    for name in names:
        rt.lora.cache.get(name)  # parsed into host memory before timing
    result["points"] = _points(plan, rt, config, [refs[n] for n in names], deadline, env)
    result["ttft_ms"] = {
        f"c{c}": ttft(rt, c, config.vocab_size) * 1e3 for c in plan.contexts if deadline.left() > 8
    }
    graphs = rt.engine.core.runner.graphs
    result["replay"] = graphs.strategy.name if graphs is not None and graphs.active else "off"
    result["attention"] = rt.engine.core.runner.attention.name
    rt.close()
    del rt, model
    return result, bench_markdown(result)


def _points(plan, rt, config, adapters: list, deadline, env: dict) -> dict:
    peak = (env.get("peak_bandwidth_tb_s") or 0) * 1e12
    points = {}
    first = [
        (2048, 64, 64),
        (2048, 64, 8),
        (2048, 64, 0),
        (512, 1, 0),
    ]  # the targets' points, before any skip
    order = sorted(plan.points(), key=lambda p: first.index(p) if p in first else len(first))
    for ctx, batch, distinct in order:
        key = f"b{batch}_c{ctx}_a{distinct}"
        if deadline.left() < 15:
            points[key] = "skipped: time box"
            continue
        step = decode_point(plan, rt, batch, ctx, adapters[:distinct], config.vocab_size)
        moved = step_bytes(rt.engine.core.runner.model, config, batch, ctx, distinct, plan.rank)
        points[key] = {"step_ms": step * 1e3, "tokens_per_s": batch / step,
                       **{f"{k}_bytes": v for k, v in moved.items()},
                       "roofline": sum(moved.values()) / step / peak if peak else None}  # fmt: skip
        print(f"  {key}: {step * 1e3:.2f} ms/step", flush=True)
    return points


def bench_markdown(r: dict) -> list[str]:
    md = [f"## (d) Benchmark: {r['shape']} ({r['params_b']:.2f} B params, random weights, rank-{r['rank']} adapters "
          f"on all 7 projections; attention {r.get('attention')}, decode replay: {r.get('replay')})", "",
          "| context | batch | distinct adapters | step ms | tokens/s | vs base | HBM roofline |",
          "|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    points = r.get("points", {})

    def context_batch_adapters(item):
        b, c, a = (int(x[1:]) for x in item[0].split("_"))
        return c, b, a

    for key, p in sorted(points.items(), key=context_batch_adapters):
        b, c, a = (int(x[1:]) for x in key.split("_"))
        if not isinstance(p, dict):
            md.append(f"| {c} | {b} | {a} | {p} | | | |")
            continue
        base = points.get(f"b{b}_c{c}_a0")
        ratio = p["tokens_per_s"] / base["tokens_per_s"] if isinstance(base, dict) else None
        roof = f"{p['roofline']:.0%}" if p.get("roofline") else "n/a"
        md.append(f"| {c} | {b} | {a} | {p['step_ms']:.2f} | {p['tokens_per_s']:.0f} | "
                  f"{ratio:.3f} | {roof} |" if ratio else f"| {c} | {b} | {a} | {p['step_ms']:.2f} | "
                  f"{p['tokens_per_s']:.0f} | | {roof} |")  # fmt: skip
    md += [
        "",
        "TTFT (batch 1, base): " + ", ".join(f"{k}: {v:.1f} ms" for k, v in r.get("ttft_ms", {}).items()),
    ]
    itl = [f"batch {k.split('_')[0][1:]}, context {k.split('_')[1][1:]}: {p['step_ms']:.2f} ms"
           for k, p in points.items() if k.endswith("_a0") and isinstance(p, dict)]  # fmt: skip
    md += ["ITL (one decode step, base): " + ", ".join(itl), "", "Baselines (decode step ms, same model, "
           "SDPA, CUDA-synchronized), with ours at the same point:", "",
           "| system | point | step ms | ours step ms | ours / system throughput |", "|---|---|---:|---:|---:|"]  # fmt: skip
    for system, values in r.get("baselines", {}).items():
        for point, seconds in values.items():
            ours = points.get(f"{point}_a{system.rsplit('_', 1)[1] if 'peft' in system else 0}")
            ours_ms = ours["step_ms"] if isinstance(ours, dict) else None
            speedup = f"{seconds * 1e3 / ours_ms:.2f}" if ours_ms else ""
            md.append(
                f"| {system} | {point} | {seconds * 1e3:.2f} | {f'{ours_ms:.2f}' if ours_ms else ''} | {speedup} |"
            )
    return md


def targets(data: dict) -> dict:
    """The issue's targets, read off the results (None where the point did not run)."""

    def point(shape, key):
        p = data.get(f"bench-{shape.split('-')[1]}", {}).get("points", {}).get(key)
        return p if isinstance(p, dict) else None

    b64 = point("llama-8b", "b64_c2048_a64")
    base, eight = point("llama-8b", "b64_c2048_a0"), point("llama-8b", "b64_c2048_a8")
    one = point("llama-1b", "b1_c512_a0")
    engine = data.get("engine", {})
    return {
        "8b_b64_c2048_64_adapters_roofline>=0.60": b64 and b64["roofline"] and b64["roofline"] >= 0.60,
        "8b_8_adapters_vs_base>=0.95": base
        and eight
        and eight["tokens_per_s"] / base["tokens_per_s"] >= 0.95,
        "1b_b1_step_within_1.5x_roofline": one and one["roofline"] and one["roofline"] >= 1 / 1.5,
        "peft_parity_32_steps_every_request": engine.get("peft_exact_pass"),
        "graphs_on_off_identical": engine.get("graphs_vs_eager_tokens_identical"),
        "kernel_parity": data.get("kernels", {}).get("pass"),
    }


def targets_markdown(data: dict) -> list[str]:
    rows = targets(data)
    return ["## Targets", "", "| target | met |", "|---|---|"] + [
        f"| {k} | {'yes' if v else 'not run' if v is None else 'NO'} |" for k, v in rows.items()
    ]
