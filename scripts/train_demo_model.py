"""Trains the embedded demo model (``models/demo``): a byte-level BPE tokenizer and a small Llama.

Why a trained model at all: random weights produce noise, and a server demo whose output is noise
cannot show that adapters change anything. This one is trained from scratch on Python's own
documentation, with a sample of stdlib code, licenses and shouting (see ``demo_corpus``), so its
continuations read like Python docs and the demo adapters only have to pick a style.

Deterministic: fixed seeds and data order, and the result does not depend on the thread count. Just
under ten minutes on two CPU cores (1.68M tokens at ~3k tokens/s in fp32 on 2 AVX2 cores). fp32 is
the default because bf16 autocast is only fast on CPUs with native bf16 (AVX512-BF16/AMX): without
it the same run took ~37x longer. ``--bf16`` opts in where the CPU has it. The artifacts
are committed, so serving never needs this script. Retraining the default model also retrains the
demo adapters, which only fit the base they were trained on.

    python scripts/train_demo_model.py [--out models/demo] [--steps 820] [--no-adapters]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import demo_corpus
import torch
import train_demo_adapters
from demo_training import TrainConfig, continuations, make_deterministic, pack_windows, train
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from server.model import synthetic

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "models" / "demo"
DEFAULT_STORE = REPO_ROOT / "adapters_store"
VOCAB_SIZE = 4096
MAX_POSITIONS = 1024
SAMPLE_PROMPTS = ["The function returns", "If the file does not exist,", "A class can"]


def train_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """Byte-level BPE (any UTF-8 round-trips) that prepends BOS like Llama's tokenizer does."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=list(demo_corpus.SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    bos = demo_corpus.SPECIAL_TOKENS[1]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=list(demo_corpus.SPECIAL_TOKENS[3:]),
        chat_template=demo_corpus.CHAT_TEMPLATE,
        model_max_length=MAX_POSITIONS,
        clean_up_tokenization_spaces=False,
    )


def model_config(tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    """~5.8M parameters: GQA (4 query heads, 2 KV heads of 64), tied embeddings, 6 layers."""
    return synthetic.model_config(
        "llama",
        "demo",
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def token_documents(
    tokenizer: PreTrainedTokenizerFast, plain: list[str], chats: list[str]
) -> list[list[int]]:
    """Plain documents become ``<s> text </s>``; chat documents already carry their special tokens."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    encode = tokenizer.backend_tokenizer.encode_batch
    docs = [[bos, *e.ids, eos] for e in encode(plain, add_special_tokens=False)]
    docs += [e.ids for e in encode(chats, add_special_tokens=False)]
    # Interleave the two kinds deterministically so packed windows mix prose and chat turns.
    order = torch.randperm(len(docs), generator=torch.Generator().manual_seed(1234)).tolist()
    return [docs[i] for i in order]


def make_tokenizer_config_portable(path: Path) -> None:
    """transformers 5 names its own backend class and keeps the chat template only in
    ``chat_template.jinja``; the generic class name and an inline copy of the template keep the files
    usable by transformers 4.x and by tools that read ``tokenizer_config.json`` directly."""
    config = json.loads(path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config["chat_template"] = demo_corpus.CHAT_TEMPLATE
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def save(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, out: Path) -> None:
    """bf16 weights halve the artifact; servers upcast to fp32 on CPU, which is exact."""
    if out.exists():
        shutil.rmtree(out)
    model.to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)
    make_tokenizer_config_portable(out / "tokenizer_config.json")
    GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ).save_pretrained(out)


def show_samples(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast) -> None:
    for kind, sample in (("greedy", False), ("sampled", True)):
        for prompt, text in zip(
            SAMPLE_PROMPTS, continuations(model, tokenizer, SAMPLE_PROMPTS, sample=sample), strict=True
        ):
            print(f"--- {kind}: {prompt!r}\n{prompt}{text}")
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What does textwrap.dedent do?"}],
        add_generation_prompt=True,
        return_tensors="pt",
    )
    ids = chat if isinstance(chat, torch.Tensor) else chat["input_ids"]
    reply = model.generate(ids, max_new_tokens=60, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    print(f"--- chat: 'What does textwrap.dedent do?'\n{tokenizer.decode(reply[0, ids.shape[1] :])}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--steps", type=int, default=820)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2.5e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=2, help="results do not depend on it; 1 suits a busy machine"
    )
    parser.add_argument(
        "--bf16",
        action="store_true",
        help="bf16 autocast: faster only on CPUs with native bf16 (AVX512-BF16/AMX)",
    )
    parser.add_argument(
        "--adapter-store",
        type=Path,
        default=None,
        help="retrain the demo adapters into this store afterwards (default: adapters_store/ when --out is "
        "the default model, since adapters trained on an older base no longer fit it)",
    )
    parser.add_argument("--no-adapters", action="store_true", help="train the base model only")
    args = parser.parse_args()
    store = args.adapter_store or (DEFAULT_STORE if args.out.resolve() == DEFAULT_OUT else None)

    make_deterministic(args.seed, args.threads)
    start = time.perf_counter()
    plain, chats = demo_corpus.pretraining_documents(), demo_corpus.chat_documents()
    print(
        f"corpus: {len(plain)} plain docs ({demo_corpus.digest(plain)}), {len(chats)} chat docs", flush=True
    )
    tokenizer = train_tokenizer(plain + chats)
    docs = token_documents(tokenizer, plain, chats)
    print(f"tokenizer: {len(tokenizer)} tokens, corpus {sum(map(len, docs)):,} tokens", flush=True)

    model = LlamaForCausalLM(model_config(tokenizer))
    print(f"model: {sum(p.numel() for p in model.parameters()):,} parameters", flush=True)
    cfg = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        lr=args.lr,
        warmup=30,
        weight_decay=0.1,
        bf16=args.bf16,
        seed=args.seed,
    )
    result = train(model, pack_windows(docs, args.seq_len), cfg, "base")
    save(model, tokenizer, args.out)
    model = LlamaForCausalLM.from_pretrained(args.out, dtype=torch.float32)  # what servers will load
    show_samples(model, tokenizer)
    size = sum(p.stat().st_size for p in args.out.iterdir())
    print(
        f"saved {args.out} ({size / 2**20:.1f} MiB); final loss {result.final_loss:.3f}, eval {result.eval_loss:.3f}, "
        f"{result.tokens:,} tokens, total {time.perf_counter() - start:.0f}s",
        flush=True,
    )
    if store is not None and not args.no_adapters:
        opts = train_demo_adapters.RunOptions(seed=args.seed, threads=args.threads)
        train_demo_adapters.train_all(args.out, store, sorted(train_demo_adapters.ADAPTERS), opts)


if __name__ == "__main__":
    main()
