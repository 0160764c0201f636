"""The pure logic of the peer benchmark (benchmarks/peers, benchmarks/roofline.py): reading vLLM's and
llama.cpp's results, the median and ratio tables, the FLOP count behind the roofline line, the proxy's
request rewrite, and the bench model's tokenizer that every server must read alike. The benchmark
itself needs the peers installed and runs outside the test suite (``make bench-peer``)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaForCausalLM

from benchmarks.peers.llamacpp import parse_batched_bench
from benchmarks.peers.lora_proxy import rewrite
from benchmarks.peers.report import Samples, agreement, parse_vllm_bench, serve_table, throughput_table
from benchmarks.roofline import (
    ModelShape,
    decode_step_rate,
    dram_read_bandwidth,
    gemm_peak,
    mixed_step_ceiling,
)
from server.model.synthetic import char_tokenizer, model_config

# What `vllm bench serve --save-result --percentile-metrics ttft,tpot,itl,e2el --metric-percentiles 50,99`
# writes (trimmed to the fields read, plus a few that are not).
VLLM_RESULT = {
    "duration": 10.7, "completed": 64, "failed": 0, "total_input_tokens": 4096, "total_output_tokens": 4096,
    "request_throughput": 5.98, "output_throughput": 382.8, "total_token_throughput": 765.6,
    "mean_ttft_ms": 4001.2, "median_ttft_ms": 4159.0, "std_ttft_ms": 300.1, "p50_ttft_ms": 4159.0,
    "p99_ttft_ms": 4893.4, "mean_itl_ms": 95.0, "median_itl_ms": 92.1, "p50_itl_ms": 92.1, "p99_itl_ms": 722.0,
    "errors": [""] * 64,
}  # fmt: skip


def test_vllm_bench_result_is_read_and_failed_runs_are_refused():
    r = parse_vllm_bench(VLLM_RESULT, 64)
    assert (r.output_throughput, r.ttft_p50_ms, r.ttft_p99_ms, r.itl_p50_ms, r.itl_p99_ms) == (
        382.8, 4159.0, 4893.4, 92.1, 722.0)  # fmt: skip
    without_p50 = {k: v for k, v in VLLM_RESULT.items() if not k.startswith("p50")}
    assert parse_vllm_bench(without_p50, 64).itl_p50_ms == 92.1  # falls back to the median
    with pytest.raises(ValueError, match="60/64 requests completed, 4 failed.*timeout"):
        parse_vllm_bench({**VLLM_RESULT, "completed": 60, "failed": 4, "errors": ["", "timeout"]}, 64)


def test_batched_bench_jsonl_line_is_read_with_prefill_in_the_time():
    out = (
        "main: n_kv_max = 4096, n_batch = 2048\n"
        '{"n_kv_max": 4096, "pp": 64, "tg": 64, "pl": 32, "n_kv": 4096, "t_pp": 1.0, "speed_pp": 2048.0, '
        '"t_tg": 3.0, "speed_tg": 682.7, "t": 4.0, "speed": 1024.0}\n'
    )
    got = parse_batched_bench(out)
    assert got["tokens_per_s"] == 32 * 64 / 4.0 and got["decode_tokens_per_s"] == 682.7
    with pytest.raises(ValueError):
        parse_batched_bench("llama_model_load: error loading model\n")


def test_medians_ratios_and_tables():
    s = Samples()
    for lp, vl in [(400, 600), (467, 640), (500, 700)]:
        s.add(("float32", "base"), "loraplex", lp)
        s.add(("float32", "base"), "vLLM-CPU", vl)
    s.add(("float32", "base"), "llama.cpp", 800)
    assert s.median(("float32", "base"), "loraplex") == 467 and s.median(("x",), "loraplex") is None
    table = throughput_table(s, [("float32", "base")])
    row = table.splitlines()[2].split()
    assert row[:7] == ["float32", "base", "467.0", "640.0", "800.0", "0.73", "0.58"]
    assert "400-500" in table

    serve = Samples()
    for system, tps in [("loraplex", 380.0), ("vLLM-CPU", 340.0)]:
        for field, value in zip(("output_throughput", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms"),
                                (tps, 4159, 4893, 92, 722), strict=True):  # fmt: skip
            serve.add(("mixed-8, all at once", field), system, value)
    lines = serve_table(serve, ["mixed-8, all at once"]).splitlines()
    assert len(lines) == 4 and "llama.cpp" not in "".join(lines)  # a system without results has no row
    assert lines[3].split()[-1] == "1.12"  # loraplex / vLLM output tok/s


def test_greedy_agreement_counts_the_shared_prefix():
    assert agreement([5, 6, 7, 8], [5, 6, 9, 8]) == 2
    assert agreement([1, 2], [1, 2, 3]) == 2 and agreement([], [1]) == 0


def test_proxy_turns_an_adapter_name_into_llama_servers_lora_field():
    loras = {"bench-r16-3": 3}
    body = json.loads(rewrite(json.dumps({"model": "bench-r16-3", "prompt": "x"}).encode(), loras, "bench"))
    assert body == {"model": "bench", "prompt": "x", "lora": [{"id": 3, "scale": 1.0}]}
    base = json.dumps({"model": "bench", "prompt": "x"}).encode()
    assert json.loads(rewrite(base, loras, "bench")) == {"model": "bench", "prompt": "x"}
    assert rewrite(b"not json", loras, "bench") == b"not json"


def test_flop_count_matches_the_bench_model():
    config = model_config("llama", "bench")
    shape = ModelShape.from_config(config)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert shape.matmul_params() == linear  # every projection and the LM head, not the embedding
    # LoRA rank 16 on all seven projections: 2 * r * (in + out) per projection and layer
    assert shape.lora_flops_per_token(16) == 2 * 16 * 8 * (1024 + 640 + 640 + 1024 + 3 * (512 + 1376))
    # one adapter's A and B: r * (in + out) per projection; the peers' bench adapters are 4.6 MB in fp32
    assert shape.lora_weights(16) == shape.lora_flops_per_token(16) // 2
    assert shape.lora_weights(16) * 4 == 4_603_904
    step = shape.decode_step_flops(batch=32, context=96, lora_rows=32, lora_rank=16)
    assert step == 32 * (2 * linear + 4 * 8 * 512 * 96 + shape.lora_flops_per_token(16))
    # a request end to end: 127 positions through the layers, 64 tokens through the LM head
    per_layer_params = linear - 512 * 32000
    assert (
        shape.request_flops(64, 64)
        == 2 * per_layer_params * 127 + 4 * 8 * 512 * 127 * 128 // 2 + 2 * 512 * 32000 * 64
    )


def test_decode_step_rate_takes_the_median_at_the_largest_batch():
    class Step:
        def __init__(self, seconds, batch):
            self.seconds, self.batch, self.context, self.lora_rows = seconds, batch, 10, 0

    shape = ModelShape(hidden=8, intermediate=16, layers=1, heads=2, kv_heads=1, vocab=32)
    rate, batch, n = decode_step_rate([Step(1.0, 4), Step(2.0, 4), Step(4.0, 4), Step(0.1, 2)], shape)
    assert (batch, n) == (4, 3) and rate == pytest.approx(shape.decode_step_flops(4, 10) / 2.0)
    assert decode_step_rate([], shape) is None
    assert gemm_peak(torch.float32, n=64, repeats=1) > 0


def test_the_mixed_step_ceiling_from_adapter_bytes():
    # 12 ms base step, 36 MB of adapter weights at 40 GB/s = 0.9 ms: at best 12 / 12.9 of base speed
    assert mixed_step_ceiling(0.012, 36_000_000, 40e9) == pytest.approx(12 / 12.9)
    assert dram_read_bandwidth(megabytes=8, repeats=1) > 1e8


def test_bench_tokenizer_keeps_ids_through_text_one_character_per_token():
    tok = char_tokenizer(32000)
    ids = [3, 4, 1000, 20000, 27586, 31999]
    text = tok.decode(ids)
    assert len(text) == len(ids) and tok.encode(text) == ids  # no BOS, no merges, no space prefix
    assert tok.convert_ids_to_tokens([0, 1, 2]) == ["<unk>", "<s>", "</s>"]
    assert len(set(tok.decode(list(range(3, 32000))))) == 31997


def test_every_round_gets_prompts_no_prefix_cache_has_seen():
    from benchmarks.peers.protocol import round_prompts

    prompts = [[1, 2, 3, 4], [5, 6, 7, 8]]
    rounds = [round_prompts(prompts, r) for r in (1, 2, 3)]
    assert rounds[0] == [[2, 3, 4, 1], [6, 7, 8, 5]]
    firsts = {tuple(p[0] for p in batch) for batch in [prompts, *rounds]}
    assert len(firsts) == 4  # each round starts every prompt with another token: no shared prefix
    assert all(sorted(map(sorted, batch)) == sorted(map(sorted, prompts)) for batch in rounds)


def test_worker_protocol_lines_and_server_workloads():
    from benchmarks.peers.protocol import MARK, parse
    from benchmarks.peers.serving import workloads

    assert parse(MARK + '{"op": "run", "tokens_per_s": 1.5}') == {"op": "run", "tokens_per_s": 1.5}
    assert parse("INFO 11-30 vllm log line") is None
    loads = workloads(4.0, 8)
    assert [(w.label, w.rate, w.mixed) for w in loads] == [
        ("base, all at once", "inf", False), ("base, Poisson 4/s", "4", False),
        ("mixed-8, all at once", "inf", True), ("mixed-8, Poisson 4/s", "4", True)]  # fmt: skip
