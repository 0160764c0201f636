"""Shared fixtures: tiny random-init models built locally (no hub downloads)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from tests.model_factory import make_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A random-init Llama (GQA) saved in HF format, with a byte-level tokenizer copied from the demo."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny_llama"), "llama")


@pytest.fixture(scope="session")
def tiny_llama_spec(tiny_llama_dir):
    """What adapters for the tiny Llama are validated against (its targetable linears)."""
    from server.lora.spec import BaseModelSpec
    from tests.lora_fixtures import load_base

    return BaseModelSpec.from_model(load_base(tiny_llama_dir))


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory) -> Path:
    """A random-init Qwen2 (q/k/v biases) saved in HF format."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny_qwen2"), "qwen2")


@pytest.fixture(autouse=True, scope="session")
def _single_thread_torch():
    """Tiny test models gain nothing from intra-op threads, and when other processes share the cores
    an OpenMP team spin-waiting on a descheduled peer turns a 10 ms forward into a second."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    yield


@pytest.fixture
def kernels_on_any_cpu(monkeypatch):
    """A native kernel's results are tested wherever it builds, also on a CPU where the engine leaves
    it unused (``server.native.wide_vector_cpu``, ``cpu_linear.panel_kernel_tuned``)."""
    from server import native
    from server.model import cpu_linear

    monkeypatch.setattr(native, "wide_vector_cpu", lambda: True)
    monkeypatch.setattr(cpu_linear, "panel_kernel_tuned", lambda: True)
