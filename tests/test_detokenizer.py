"""Streaming detokenization emits only complete UTF-8 text and holds back possible stop strings."""

from __future__ import annotations

from transformers import AutoTokenizer

from server.engine.detokenizer import IncrementalDetokenizer

TEXT = "naïve café — 日本語 ✓ done, déjà vu"


def _stream(tok, ids, stop=()):
    detok = IncrementalDetokenizer(tok, tok.encode("Say:"), list(stop))
    deltas, hit = [], None
    for token in ids:
        hit = detok.add_tokens([token])
        deltas.append(detok.flush(finished=hit is not None))
        if hit:
            break
    if not hit:
        deltas.append(detok.flush(finished=True))
    return deltas, hit


def test_multibyte_characters_stream_whole(tiny_llama_dir):
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    ids = tok.encode(TEXT)
    assert len(ids) > len(TEXT.split())  # multi-byte characters are split across tokens
    deltas, _ = _stream(tok, ids)
    assert "".join(deltas) == tok.decode(ids) == TEXT
    assert all("\ufffd" not in d for d in deltas)


def test_stop_string_is_never_streamed(tiny_llama_dir):
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    deltas, hit = _stream(tok, tok.encode(TEXT), stop=["日本"])
    assert hit == "日本"
    assert "".join(deltas) == "naïve café — "


def test_first_token_keeps_its_space_after_a_tail_of_special_tokens():
    """Decoders that put spaces between tokens (WordPiece here) give the first token of a decode no
    space: the context must reach back past special tokens to real prompt text."""
    from server.model.synthetic import word_tokenizer

    tok = word_tokenizer(64)
    for prompt in ([5, 7], [5] + [1] * 8, [5] + [2] * 30, [1] * 12):
        detok = IncrementalDetokenizer(tok, prompt, [])
        for token in (9, 11):
            detok.add_tokens([token])
        text = detok.flush(finished=True)
        prompt_text = tok.decode(prompt, skip_special_tokens=True)
        assert prompt_text + text == tok.decode(prompt + [9, 11], skip_special_tokens=True), prompt


def test_the_backend_shortcut_decodes_as_the_tokenizer(tiny_llama_dir):
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    detok = IncrementalDetokenizer(tok, [1, 2, 3], [])
    assert detok._backend is not None
    ids = list(range(0, min(tok.vocab_size, 300), 7)) + [tok.eos_token_id or 0] + [260, 261, 262]
    for n in range(1, len(ids)):
        assert detok._decode(ids[:n]) == tok.decode(
            ids[:n], skip_special_tokens=True, clean_up_tokenization_spaces=False
        )


def test_a_tokenizer_with_its_own_decode_keeps_it(tiny_llama_dir):
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)

    class Custom(type(tok)):
        def _decode(self, token_ids, **kwargs):
            return "custom"

    tok.__class__ = Custom
    detok = IncrementalDetokenizer(tok, [1, 2, 3], [])
    assert detok._backend is None and detok._decode([5]) == "custom"
