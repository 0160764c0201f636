"""The peer workload's files: the bench model, 8 PEFT adapters, and their GGUF conversions for llama.cpp.

Built once under ``.peers/work/<shape>`` and reused (the model and adapters are seeded, so a rebuild
gives the same bytes). The GGUF files come from llama.cpp's own converters (``convert_hf_to_gguf.py``,
``convert_lora_to_gguf.py`` from the vendored tree, run with the peers' virtualenv), as a llama.cpp
user would make them; the bench model's one-character tokenizer converts with its ids unchanged.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from benchmarks.lora_bench import make_adapters
from benchmarks.peers.install import Peers
from benchmarks.workload import make_bench_model

GGUF_TYPES = {"float32": "f32", "bfloat16": "bf16"}


@dataclass(frozen=True)
class Assets:
    model: Path
    store: Path
    adapters: list[str]

    def gguf_model(self, dtype: str) -> Path:
        return self.model.parent / "gguf" / f"model-{GGUF_TYPES[dtype]}.gguf"

    def gguf_adapter(self, name: str, dtype: str) -> Path:
        return self.model.parent / "gguf" / f"{name}-{GGUF_TYPES[dtype]}.gguf"


def build_assets(peers: Peers, shape: str, num_adapters: int = 8, rank: int = 16) -> Assets:
    root = peers.work / shape
    model = make_bench_model(root / "model", shape)
    store = root / "store"
    store.mkdir(parents=True, exist_ok=True)
    return Assets(model, store, make_adapters(model, store, num_adapters, rank))


def convert_gguf(peers: Peers, assets: Assets, dtype: str) -> None:
    """The model and every adapter as GGUF in ``dtype`` (skipped when already there)."""
    out = assets.gguf_model(dtype)
    out.parent.mkdir(parents=True, exist_ok=True)
    outtype = GGUF_TYPES[dtype]
    if not out.exists():
        _run_converter(peers, "convert_hf_to_gguf.py", [assets.model, "--outtype", outtype], out)
    for name in assets.adapters:
        lora = assets.gguf_adapter(name, dtype)
        if not lora.exists():
            args = [assets.store / name, "--base", assets.model, "--outtype", outtype]
            _run_converter(peers, "convert_lora_to_gguf.py", args, lora)


def _run_converter(peers: Peers, script: str, args: list, out: Path) -> None:
    tmp = out.with_suffix(".partial")
    argv = [peers.python, peers.llama_src / script, *map(str, args), "--outfile", tmp]
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{script} failed for {out.name}:\n{done.stderr[-3000:]}")
    tmp.rename(out)
