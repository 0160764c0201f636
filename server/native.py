"""The project's small C++ CPU kernels, built once per machine and loaded as torch ops.

Each kernel is one ``.cpp`` file that registers its ops with ``TORCH_LIBRARY`` (so they run through
the dispatcher, on torch's own intra-op thread pool, and torch.compile sees them as opaque ops). It is
compiled by ``torch.utils.cpp_extension`` for the host CPU (``-march=native``: AVX-512 and
avx512_bf16 where the CPU has them) on first use, into torch's extension cache, keyed by the source
and the CPU's feature flags, so later starts load it in well under a second. Callers ask
``load_kernel`` at start-up (never on the request path) and fall back to plain torch when it returns
False (no compiler, an unsupported platform): the kernels are a speed-up, never a requirement.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import threading
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

INCLUDE_DIR = Path(__file__).parent / "csrc"  # headers shared by the kernels (vec16.h)
# Flags appended to every kernel build, after -march=native. For building a narrower variant than the
# host's: the tests build the AVX2 kernels on an AVX-512 CPU with "-mno-avx512f" (test_native_avx2.py).
EXTRA_CFLAGS_VAR = "LORAPLEX_NATIVE_CFLAGS"
_lock = threading.Lock()
_loaded: dict[str, bool] = {}


def extra_cflags() -> list[str]:
    """The flags of ``LORAPLEX_NATIVE_CFLAGS``, appended to each build (none by default)."""
    return os.environ.get(EXTRA_CFLAGS_VAR, "").split()


def _cpu_fingerprint() -> str:
    """The CPU's feature flags (a kernel built with -march=native must not run on another CPU)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.cache
def wide_vector_cpu() -> bool:
    """Whether the kernels are built for AVX-512 (``avx512f``): 32 vector registers of 16 fp32 lanes.

    Why it matters: the argmax kernel keeps 16-lane maxima across a row (``csrc/vec16.h``'s ``v16``).
    Built for a CPU without AVX-512 it still computes the same result, but each vector becomes two
    narrower ones: measured on an AMD EPYC with AVX2 only (Zen 3, 2 cores), the [32, 32000] argmax took
    2.3 ms against torch's 1.2, so ``argmax_rows`` takes torch's there. (The panel GEMM, the attention
    and the decoder ops are written in the native width, ``vec``, and need no such gate.)"""
    if "-mno-avx512f" in extra_cflags():
        return False
    return "avx512f" in _cpu_fingerprint().split()  # also False on aarch64: not measured there


def load_kernel(name: str, source: Path, fakes: tuple[str, ...] = ()) -> bool:
    """Builds (first time on this machine) and loads ``source``; True when its ops are registered.

    ``fakes``: ops (``namespace::name``) that only write into their arguments and return nothing;
    each gets a no-op fake implementation, so torch.compile can trace through them."""
    with _lock:
        if name not in _loaded:
            _loaded[name] = _build_and_load(name, source)
            if _loaded[name]:
                for op in fakes:
                    torch.library.register_fake(op)(_writes_only)
        return _loaded[name]


def _writes_only(*args, **kwargs) -> None:
    """Fake of an op that mutates its arguments in place and returns nothing."""


def _build_and_load(name: str, source: Path) -> bool:
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "aarch64"):
        log.info("native kernel %s: not built on %s/%s; using torch ops", name, platform.system(),
                 platform.machine())  # fmt: skip
        return False
    try:
        headers = b"".join(p.read_bytes() for p in sorted(INCLUDE_DIR.glob("*.h")))
        code = source.read_bytes()
    except OSError as exc:  # an install without the sources (package data): the torch path still works
        log.warning("native kernel %s: source not readable (%s); using torch ops", name, exc)
        return False
    flags = ["-O3", "-march=native", "-fopenmp", *extra_cflags()]
    digest = hashlib.sha256(code + headers + " ".join(flags).encode() + _cpu_fingerprint().encode())
    digest = digest.hexdigest()[:12]
    start = time.perf_counter()
    try:
        from torch.utils.cpp_extension import load

        load(
            name=f"{name}_{digest}",
            sources=[str(source)],
            extra_include_paths=[str(INCLUDE_DIR)],
            extra_cflags=flags,
            extra_ldflags=["-fopenmp"],  # resolves to the libgomp torch already loaded (same soname)
            is_python_module=False,
        )
    except Exception as exc:  # no compiler, no ninja, a build error: the torch path still works
        log.warning("native kernel %s could not be built (%s); using torch ops", name, exc)
        return False
    log.info("native kernel %s ready in %.1f s", name, time.perf_counter() - start)
    return True
