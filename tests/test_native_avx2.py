"""The native kernels built for AVX2 + FMA, tested on an AVX-512 CPU too.

Each kernel is compiled for the CPU it runs on (``-march=native``), so a suite run on an AVX-512
machine never builds the AVX2 code paths (the panel GEMM's 6 x 16 register blocks, the 8-lane
``vec`` of the attention and decoder ops, the 16-lane vectors split in two) that AVX2-only machines,
such as AMD's Zen 3 EPYCs, run. This test builds them there with ``-mno-avx512f``
(``LORAPLEX_NATIVE_CFLAGS``) and runs the kernels' own tests against them in a child process: a
process loads one build of each op library.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from server import native

ROOT = Path(__file__).resolve().parents[1]
KERNEL_TESTS = [
    "tests/test_cpu_linear.py",
    "tests/test_attention_cpu.py",
    "tests/test_native_norm.py",
    "tests/test_greedy_argmax.py",
    "tests/test_lora_ops.py",
    "tests/test_lean_forward.py",
]


@pytest.mark.skipif(
    "avx512f" not in native._cpu_fingerprint().split(),
    reason="without AVX-512 the kernel tests run the AVX2 builds already",
)
def test_the_avx2_builds_pass_the_kernel_tests():
    env = {**os.environ, native.EXTRA_CFLAGS_VAR: "-mno-avx512f"}
    child = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", *KERNEL_TESTS],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert child.returncode == 0, child.stdout[-6000:] + child.stderr[-3000:]
    assert " passed" in child.stdout and " failed" not in child.stdout
