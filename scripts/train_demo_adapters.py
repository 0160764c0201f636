"""Trains the demo LoRA adapters in ``adapters_store/`` on top of the demo model.

Each adapter learns a text style the base never saw as such, so switching adapters visibly changes
the output: ``demo-code`` (stdlib Python source), ``demo-legal`` (license texts) and ``demo-shout``
(the docs in UPPERCASE). They differ in rank, target modules and scaling on purpose, so the server's
mixed batches always hold adapters of different shapes. Saved with PEFT's ``save_pretrained`` (the
two standard files only) and ``base_model_name_or_path`` relative to the repository root.

    python scripts/train_demo_adapters.py [--only demo-code] [--store adapters_store]
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import demo_corpus
import torch
from demo_training import TrainConfig, continuations, make_deterministic, pack_windows, train
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoTokenizer, LlamaForCausalLM

REPO_ROOT = Path(__file__).resolve().parent.parent
BASE_NAME = "models/demo"  # recorded in adapter_config.json; relative, so it holds on any checkout
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
SAMPLE_PROMPTS = ["The function returns", "If the file does not exist,", "A class can"]


@dataclass(frozen=True)
class AdapterSpec:
    documents: Callable[[], list[str]]
    rank: int
    alpha: int
    targets: tuple[str, ...]
    rslora: bool = False
    steps: int = 150
    lr: float = 5e-3
    style_prompt: str = ""


ADAPTERS = {
    "demo-code": AdapterSpec(
        demo_corpus.code_documents, rank=16, alpha=32, targets=ATTENTION + MLP, style_prompt="def "
    ),
    "demo-legal": AdapterSpec(
        demo_corpus.legal_documents, rank=8, alpha=16, targets=ATTENTION, style_prompt="This License"
    ),
    "demo-shout": AdapterSpec(
        demo_corpus.shout_documents, rank=8, alpha=16, targets=MLP, rslora=True, style_prompt="The function"
    ),
}


def load_base(model_dir: Path) -> LlamaForCausalLM:
    """fp32 copy of the committed bf16 weights: the adapters train against exactly what is served."""
    return LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


@dataclass(frozen=True)
class RunOptions:
    batch_size: int = 8
    seq_len: int = 256
    seed: int = 0
    threads: int = 2


def train_adapter(name: str, spec: AdapterSpec, model_dir: Path, tokenizer, opts: RunOptions) -> PeftModel:
    make_deterministic(opts.seed, opts.threads)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    encoded = tokenizer.backend_tokenizer.encode_batch(spec.documents(), add_special_tokens=False)
    windows = pack_windows([[bos, *e.ids, eos] for e in encoded], opts.seq_len)
    base = load_base(model_dir)
    for p in base.parameters():
        p.requires_grad_(False)
    lora = LoraConfig(
        task_type="CAUSAL_LM",
        r=spec.rank,
        lora_alpha=spec.alpha,
        target_modules=list(spec.targets),
        lora_dropout=0.0,
        use_rslora=spec.rslora,
    )
    model = get_peft_model(base, lora)
    cfg = TrainConfig(
        steps=spec.steps,
        batch_size=opts.batch_size,
        seq_len=opts.seq_len,
        lr=spec.lr,
        warmup=10,
        seed=opts.seed,
    )
    train(model, windows, cfg, name)
    return model


def save_adapter(model: PeftModel, out: Path) -> None:
    """Exactly ``adapter_config.json`` + ``adapter_model.safetensors``; no machine paths inside."""
    if out.exists():
        shutil.rmtree(out)
    model.peft_config["default"].base_model_name_or_path = BASE_NAME
    model.save_pretrained(out)
    for extra in out.iterdir():
        if extra.name not in ("adapter_config.json", "adapter_model.safetensors"):
            extra.unlink()
    sort_target_modules(out / "adapter_config.json")


def sort_target_modules(config_path: Path) -> None:
    """PEFT writes ``target_modules`` from a set, in hash order; sorted, retraining gives identical files."""
    config = json.loads(config_path.read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def show_samples(name: str, spec: AdapterSpec, model, tokenizer) -> None:
    prompts = [*SAMPLE_PROMPTS, spec.style_prompt]
    for prompt, text in zip(prompts, continuations(model, tokenizer, prompts), strict=True):
        print(f"--- {name} greedy: {prompt!r}\n{prompt}{text}")


def train_all(model_dir: Path, store: Path, names: list[str], opts: RunOptions) -> None:
    """Train, save and show each named adapter; the base script calls this after retraining the base."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    for name in names:
        spec = ADAPTERS[name]
        model = train_adapter(name, spec, model_dir, tokenizer, opts)
        save_adapter(model, store / name)
        size = sum(p.stat().st_size for p in (store / name).iterdir())
        print(f"[{name}] saved {store / name} ({size / 2**10:.0f} KiB)", flush=True)
        show_samples(name, spec, model, tokenizer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=REPO_ROOT / "models" / "demo")
    parser.add_argument("--store", type=Path, default=REPO_ROOT / "adapters_store")
    parser.add_argument("--only", choices=sorted(ADAPTERS), action="append", help="train just these adapters")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="results do not depend on it")
    args = parser.parse_args()
    opts = RunOptions(args.batch_size, args.seq_len, args.seed, args.threads)
    train_all(args.model, args.store, args.only or sorted(ADAPTERS), opts)


if __name__ == "__main__":
    main()
