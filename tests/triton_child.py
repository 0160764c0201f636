"""Running Triton kernels on the CPU in tests: a child pytest under Triton's interpreter.

The interpreter must be on before triton is first imported (triton.language's own helpers are
decorated at import), so a test module's parent-side test starts a child pytest on that same file
with ``TRITON_INTERPRET=1`` and ``--noconftest``; its kernel tests skip in the parent ("runs in the
child") and run in the child. Such modules import only what they need at the top, to keep the child quick.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

IN_CHILD = os.environ.get("TRITON_INTERPRET") == "1"
HAS_TRITON = importlib.util.find_spec("triton") is not None


def run_child(test_file: str, timeout: float = 600) -> None:
    """The parent-side test: runs ``test_file`` under the interpreter and asserts that it passed."""
    if IN_CHILD:
        pytest.skip("this is the child run")
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "--noconftest",
        "-p",
        "no:cacheprovider",
        "-W",
        "ignore",
        test_file,
    ]
    run = subprocess.run(
        cmd, env=env, cwd=Path(__file__).parent.parent, capture_output=True, text=True, timeout=timeout
    )
    out = (run.stdout + run.stderr)[-4000:]
    assert run.returncode == 0, out
    assert " passed" in out and "failed" not in out, out


def only_in_child() -> None:
    """Skips a kernel test in the parent run."""
    if not IN_CHILD:
        pytest.skip("runs in the TRITON_INTERPRET=1 child of this module's parent-side test")
