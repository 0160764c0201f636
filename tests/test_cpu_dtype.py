"""Settings.resolved_dtype on CPU: bf16 only for half-precision checkpoints on CPUs with native bf16."""

from __future__ import annotations

import json

import pytest
import torch

from server import config
from server.config import Settings, checkpoint_dtype


def _model(tmp_path, dtype: str | None):
    tmp_path.mkdir(parents=True, exist_ok=True)
    body = {"model_type": "llama"} | ({"dtype": dtype} if dtype else {})
    (tmp_path / "config.json").write_text(json.dumps(body))
    return tmp_path


@pytest.mark.parametrize(
    "saved,native,want",
    [
        ("bfloat16", True, torch.bfloat16),
        ("float16", True, torch.bfloat16),
        ("bfloat16", False, torch.float32),
        ("float32", True, torch.float32),
        (None, True, torch.float32),
    ],
)
def test_auto_on_cpu(tmp_path, monkeypatch, saved, native, want):
    monkeypatch.setattr(config, "cpu_has_native_bf16", lambda: native)
    settings = Settings(model=_model(tmp_path / "m", saved), device="cpu")
    assert settings.resolved_dtype() == want


def test_explicit_dtype_is_honoured(tmp_path, monkeypatch):
    monkeypatch.setattr(config, "cpu_has_native_bf16", lambda: False)
    assert (
        Settings(model=_model(tmp_path, "float32"), device="cpu", dtype="bfloat16").resolved_dtype()
        == torch.bfloat16
    )


def test_checkpoint_dtype_reads_the_legacy_key(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": "float16"}))
    assert checkpoint_dtype(tmp_path) == "float16"
    assert checkpoint_dtype(tmp_path / "missing") is None
