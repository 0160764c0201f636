"""The committed demo model, tokenizer and adapters load with the standard HF/PEFT classes and behave.

These are the assets `make serve` starts on, so they are checked against the libraries themselves
(transformers and PEFT are the oracle), not against our own loader.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_DIR = REPO_ROOT / "models" / "demo"
STORE_DIR = REPO_ROOT / "adapters_store"
ADAPTERS = ("demo-code", "demo-legal", "demo-shout")
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors"}
PROMPT = "The function returns"


def _demo_corpus():
    """The training-corpus module lives with the training scripts, which are not a package."""
    spec = importlib.util.spec_from_file_location("demo_corpus", REPO_ROOT / "scripts" / "demo_corpus.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(DEMO_DIR)


@pytest.fixture(scope="module")
def base_greedy(tokenizer) -> list[int]:
    return _greedy(_base(), tokenizer)


def _base() -> LlamaForCausalLM:
    return AutoModelForCausalLM.from_pretrained(DEMO_DIR, dtype=torch.float32).eval()


def _greedy(model, tokenizer, prompt: str = PROMPT, n: int = 24) -> list[int]:
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return out[0, ids.shape[1] :].tolist()


def test_model_and_tokenizer_load_with_auto_classes(tokenizer):
    model = _base()
    config = model.config
    assert isinstance(model, LlamaForCausalLM)
    assert config.num_key_value_heads < config.num_attention_heads  # GQA, like the models we serve
    assert config.max_position_embeddings == 1024 and config.tie_word_embeddings
    assert len(tokenizer) == config.vocab_size
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (
        config.bos_token_id,
        config.eos_token_id,
        config.pad_token_id,
    )
    text = "Return the naïve value – ✓ 🐍\n\tdone"
    ids = tokenizer(text).input_ids
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == text  # byte-level: any UTF-8 round-trips


def test_artifacts_are_small_and_standard():
    names = {p.name for p in DEMO_DIR.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= names
    assert sum(p.stat().st_size for p in DEMO_DIR.iterdir()) <= 20 * 2**20
    for name in ADAPTERS:
        files = {p.name: p for p in (STORE_DIR / name).iterdir()}
        assert set(files) == ADAPTER_FILES
        assert sum(p.stat().st_size for p in files.values()) < 2 * 2**20
        config = json.loads(files["adapter_config.json"].read_text())
        assert config["peft_type"] == "LORA"
        assert not Path(config["base_model_name_or_path"]).is_absolute()


def test_chat_template_renders(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a list?"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "<s><|system|>\nBe brief.</s>\n<|user|>\nWhat is a list?</s>\n<|assistant|>\n"
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    ids = ids["input_ids"]
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id
    assert tokenizer.convert_tokens_to_ids("<|assistant|>") in ids  # role markers are single tokens
    assert _demo_corpus().render_chat(messages) + "<|assistant|>\n" == text  # training saw this format


def test_base_continuation_is_made_of_corpus_words(tokenizer):
    corpus = _demo_corpus()
    vocabulary = corpus.words(corpus.base_documents())
    text = tokenizer.decode(_greedy(_base(), tokenizer, n=40), skip_special_tokens=True)
    tokens = text.split()
    stripped = (t.strip(".,;:()'\"`!?") for t in tokens)
    known = [w for w in stripped if w.isalpha() and w.lower() in vocabulary]
    assert len(tokens) >= 10, text
    assert len(known) > 0.7 * len(tokens), text


@pytest.mark.parametrize("name", ADAPTERS)
def test_adapter_loads_with_peft_and_changes_greedy_output(tokenizer, base_greedy, name):
    model = PeftModel.from_pretrained(_base(), STORE_DIR / name).eval()
    assert model.peft_config["default"].base_model_name_or_path == "models/demo"
    assert _greedy(model, tokenizer) != base_greedy


def _shouts(text: str) -> bool:
    return sum(c.isupper() for c in text) > sum(c.islower() for c in text)


STYLES = {
    # adapter: (prompt, predicate on the greedy continuation that the base model's continuation fails)
    "demo-code": ("def ", lambda text: re.search(r"\bdef \w+\(", text) is not None),
    "demo-legal": (
        PROMPT,
        lambda text: re.search(r"\b(License|Library|Licensee|distribute|copyright)\b", text),
    ),
    "demo-shout": (PROMPT, _shouts),
}


@pytest.mark.parametrize("name", ADAPTERS)
def test_adapter_output_has_its_style(tokenizer, name):
    prompt, has_style = STYLES[name]
    base_text = tokenizer.decode(_greedy(_base(), tokenizer, prompt, n=40), skip_special_tokens=True)
    model = PeftModel.from_pretrained(_base(), STORE_DIR / name).eval()
    text = tokenizer.decode(_greedy(model, tokenizer, prompt, n=40), skip_special_tokens=True)
    assert has_style(text), text
    assert not has_style(base_text), base_text
