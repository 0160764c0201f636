"""The CPU runtime `loraplex serve` sets up by default: a faster allocator and a tuned OpenMP.

Much of a CPU decode step's cost sits below Python. glibc's malloc hands the large, short-lived
activation buffers of every step back to the kernel and faults them in again; an OpenMP team whose
threads float between cores loses its caches and, on a busy host, spin-waits on descheduled peers.
vLLM-CPU's documented set-up preloads tcmalloc and Intel's OpenMP and binds its threads; this module
gives loraplex's users the same by default (``benchmarks/runtime_bench.py`` measures each piece):

- **allocator**: tcmalloc (Debian ``libtcmalloc-minimal4``), else jemalloc (``libjemalloc2``);
- **OpenMP runtime**: Intel's ``libiomp5`` (pip ``intel-openmp``), else LLVM's ``libomp.so.5``, in
  place of torch's own GNU ``libgomp`` (both serve torch's GOMP calls);
- **threads**: ``OMP_NUM_THREADS`` = the CPUs this process may use (its affinity mask, capped by a
  cgroup CPU quota, as in a container), bound one per core: ``KMP_AFFINITY=granularity=fine,compact,1,0``
  for Intel's and LLVM's runtime, ``OMP_PROC_BIND=close OMP_PLACES=cores`` for GNU's. (Not
  ``OMP_PROC_BIND`` for all three: the engine's team is started by the engine thread, not by the
  process's first thread, and Intel's and LLVM's runtimes then put every thread of such a team on
  the first core; ``KMP_AFFINITY`` binds it across the cores.) Their threads spin-wait at most 1 ms
  after a parallel region (``KMP_BLOCKTIME=1``), not 200 ms, so the front end gets the cores between ops;
- **huge pages** (a piece the runtime benchmark measures, not applied by default): torch's CPU
  allocator backs every buffer of 2 MB or more with transparent huge pages (``THP_MEM_ALLOC_ENABLE=1``:
  2 MB-aligned, ``madvise(MADV_HUGEPAGE)``) where the kernel's THP mode is ``madvise`` or ``always``. A
  decode step streams all weights from DRAM, and with 4 KB pages every 4 KB is a TLB miss and a stop
  for the hardware prefetcher. Measured on the development machine: decode steps 1-5 % faster, base
  and mixed-8 alike, an adapter target's cold kernel call ~25 % faster; but start-up ~1 s slower (4.0
  -> 5.1-5.6 s to the first completion: the 1 GB KV cache and every large buffer are faulted in as huge
  pages, with compaction), past the 5 s start-up the server keeps. Set ``THP_MEM_ALLOC_ENABLE=1``
  yourself to take the trade; the start-up log says whether it is on.

``LD_PRELOAD`` is read by the dynamic loader only when a process starts, so :func:`reexec_if_needed`
re-executes the command once with the planned environment (``execv`` keeps the PID: in a container
loraplex stays PID 1). What is missing is skipped (the server runs fine without any of it), variables
the user already set win, and :func:`describe` reads what is really in effect back from the process's
own memory maps for the start-up log. Opt out with ``--no-runtime-tuning`` (``LORAPLEX_RUNTIME_TUNING=0``).

A bound OpenMP runtime pins the thread that loads it (the main thread, at ``import torch``) to the
first core, and every thread started afterwards would inherit that one core: :func:`unpin_main_thread`
gives the main thread back all CPUs right after torch is imported, so only OpenMP teams stay bound.
"""

from __future__ import annotations

import math
import os
import re
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

# Set in the re-executed process: the CPU list it may use (the main thread's mask before OpenMP pinned it).
TUNED_MARKER = "LORAPLEX_RUNTIME_CPUS"
ALLOCATORS = {"tcmalloc": ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4"), "jemalloc": ("libjemalloc.so.2",)}
OPENMP_RUNTIMES = {"intel": ("libiomp5.so",), "llvm": ("libomp.so.5",)}
# Variables by which a user binds threads already: then the plan binds nothing.
BIND_VARS = ("OMP_PROC_BIND", "OMP_PLACES", "KMP_AFFINITY", "GOMP_CPU_AFFINITY")
KMP_BIND = {"KMP_AFFINITY": "granularity=fine,compact,1,0"}  # Intel and LLVM OpenMP
GNU_BIND = {"OMP_PROC_BIND": "close", "OMP_PLACES": "cores"}
# Intel's and LLVM's teams spin 200 ms after each parallel region by default, on the cores the event
# loop, the tokenizer and (on one machine) the clients need between the engine's ops: 1 ms, as vLLM-CPU
# sets 5 for its engine process (whose front end runs in another process).
KMP_WAIT = {"KMP_BLOCKTIME": "1"}
# torch's CPU allocator: 2 MB-aligned, madvise(MADV_HUGEPAGE)'d buffers from 2 MB up (c10/core/alloc_cpu;
# the variable is read once, at the first allocation; newer torch releases spell it with a C10_ prefix).
HUGE_PAGES = {"THP_MEM_ALLOC_ENABLE": "1", "C10_THP_MEM_ALLOC_ENABLE": "1"}
THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")
# What each name looks like in /proc/self/maps, for describe().
_MAPPED = {**ALLOCATORS, **OPENMP_RUNTIMES, "gnu": ("libgomp",)}


@dataclass(frozen=True)
class Pieces:
    """Which parts of the set-up to apply (all by default; the runtime benchmark toggles each).
    ``allocator`` / ``openmp``: "auto" (the first found, in the order of the tables above), one name
    from them, or None (glibc malloc / torch's GNU libgomp)."""

    allocator: str | None = "auto"
    openmp: str | None = "auto"
    threads: bool = True
    bind: bool = True
    huge_pages: bool = False  # opt-in: see the module docstring


@dataclass(frozen=True)
class RuntimePlan:
    """The environment a tuned process gets, and what it found for it."""

    cpus: tuple[int, ...]
    allocator: tuple[str, Path] | None = None
    openmp: tuple[str, Path] | None = None
    env: dict[str, str] = field(default_factory=dict)


def usable_cpus() -> tuple[int, ...]:
    """The CPUs this process may run on, trimmed to a cgroup v2 CPU quota (a container's ``--cpus``)."""
    cpus = tuple(sorted(os.sched_getaffinity(0)))
    quota = _cgroup_cpu_quota(Path("/sys/fs/cgroup/cpu.max"))
    return cpus[: max(1, math.ceil(quota))] if quota is not None and quota < len(cpus) else cpus


def _cgroup_cpu_quota(path: Path) -> float | None:
    try:
        quota, period = path.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    return None if quota == "max" else int(quota) / int(period)


def library_dirs() -> list[Path]:
    """Where Debian packages and pip wheels (``intel-openmp`` installs into ``<prefix>/lib``) put libraries."""
    multiarch = sysconfig.get_config_var("MULTIARCH") or "x86_64-linux-gnu"
    roots = [Path(sys.prefix) / "lib", Path("/usr/local/lib"), Path("/usr/lib") / multiarch]
    return roots + [Path("/lib") / multiarch, Path("/usr/lib64"), Path("/usr/lib")]


def find_library(candidates: dict[str, tuple[str, ...]], dirs: list[Path]) -> tuple[str, Path] | None:
    """The first ``(name, path)`` whose file exists, in the order of ``candidates`` (preference) then dirs."""
    for name, files in candidates.items():
        for filename in files:
            for directory in dirs:
                if (directory / filename).is_file():
                    return name, directory / filename
    return None


def choose(table: dict[str, tuple[str, ...]], choice: str | None, dirs: list[Path], preload: str):
    """The library ``choice`` selects from ``table``, unless the user preloads one of them already."""
    if choice is None or any(f in preload for files in table.values() for f in files):
        return None
    return find_library(table if choice == "auto" else {choice: table[choice]}, dirs)


def thp_mode(path: Path = THP_MODE) -> str | None:
    """The kernel's transparent huge page mode (the bracketed word: always, madvise, never); None if unknown."""
    try:
        found = re.search(r"\[(\w+)\]", path.read_text())
    except OSError:
        return None
    return found.group(1) if found else None


def plan(environ: dict[str, str], pieces: Pieces = Pieces(), dirs: list[Path] | None = None,
         thp: str | None = None) -> RuntimePlan:  # fmt: skip
    """The variables to add to ``environ``; a variable the user already set is left as it is.
    ``thp``: the THP mode (read from the kernel when None)."""
    dirs = library_dirs() if dirs is None else dirs
    cpus = usable_cpus()
    preload = environ.get("LD_PRELOAD", "")
    allocator = choose(ALLOCATORS, pieces.allocator, dirs, preload)
    openmp = choose(OPENMP_RUNTIMES, pieces.openmp, dirs, preload)
    wanted: dict[str, str] = {}
    libs = [str(found[1]) for found in (allocator, openmp) if found]
    if libs:
        wanted["LD_PRELOAD"] = ":".join(libs + ([preload] if preload else []))
    if pieces.threads:
        wanted["OMP_NUM_THREADS"] = str(len(cpus))
    kmp = openmp is not None or any(f in preload for files in OPENMP_RUNTIMES.values() for f in files)
    if pieces.bind and not any(var in environ for var in BIND_VARS):
        wanted.update(KMP_BIND if kmp else GNU_BIND)
    if kmp and pieces.threads:
        wanted.update(KMP_WAIT)
    if pieces.huge_pages and (thp or thp_mode()) in ("always", "madvise"):
        wanted.update(HUGE_PAGES)
    env = {k: v for k, v in wanted.items() if k == "LD_PRELOAD" or k not in environ}
    return RuntimePlan(cpus, allocator, openmp, env)


def cpu_list(cpus: tuple[int, ...]) -> str:
    return ",".join(map(str, cpus))


def tuned_environ(
    environ: dict[str, str], pieces: Pieces = Pieces(), dirs: list[Path] | None = None
) -> dict[str, str]:
    """``environ`` plus the plan, marked so the re-executed process does not plan again."""
    p = plan(environ, pieces, dirs)
    return {**environ, **p.env, TUNED_MARKER: cpu_list(p.cpus)}


def reexec_if_needed(enabled: bool, device: str) -> None:
    """Re-executes this very command under the tuned environment, once; returns when nothing to do."""
    if not enabled or TUNED_MARKER in os.environ or not serves_on_cpu(device):
        return
    env = tuned_environ(dict(os.environ))
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, list(sys.orig_argv), env)
    except OSError as exc:  # the server still runs, untuned; describe() will say so
        print(f"loraplex: CPU runtime tuning skipped, re-exec failed: {exc}", file=sys.stderr)


def serves_on_cpu(device: str) -> bool:
    """Whether the engine will run on the CPU, decided without importing torch (that would double
    the start-up work before the re-exec): 'auto' means CPU where no NVIDIA device node exists."""
    if device == "cpu":
        return True
    return device == "auto" and not any(Path("/dev").glob("nvidia[0-9]*"))


def unpin_main_thread() -> None:
    """Gives the main thread back the CPUs it started with, after a bound OpenMP pinned it to one core
    on load (threads started later inherit the mask: the event loop and tokenizers must not share it)."""
    cpus = os.environ.get(TUNED_MARKER)
    if cpus:
        os.sched_setaffinity(0, {int(c) for c in cpus.split(",")})


def loaded_libraries(maps: Path = Path("/proc/self/maps")) -> dict[str, str]:
    """{'tcmalloc' | 'jemalloc' | 'intel' | 'llvm' | 'gnu': path} for the runtimes mapped into this process."""
    try:
        paths = {line.split()[-1] for line in maps.read_text().splitlines() if "/" in line}
    except OSError:
        return {}
    found = {}
    for name, files in _MAPPED.items():
        stems = "|".join(re.escape(f.split(".so")[0]) for f in files)  # libgomp.so.1, libgomp-ab12.so.1
        hits = sorted(p for p in paths if re.match(rf"(?:{stems})[-.]", Path(p).name))
        if hits:
            found[name] = hits[0]
    return found


def describe(loaded: dict[str, str], environ: dict[str, str]) -> str:
    """One start-up log line: the allocator, the OpenMP runtime, threads and binding really in effect."""
    allocator = next((f"{n} ({loaded[n]})" for n in ALLOCATORS if n in loaded), None)
    allocator = allocator or "glibc malloc (apt-get install libtcmalloc-minimal4 for tcmalloc)"
    openmp = next((f"{n} OpenMP ({loaded[n]})" for n in ("intel", "llvm") if n in loaded), None)
    if openmp is None:
        gnu = f"gnu OpenMP ({loaded['gnu']})" if "gnu" in loaded else "no OpenMP"
        openmp = f"{gnu} (apt-get install libomp5-14 or pip install intel-openmp for a faster runtime)"
    threads = environ.get("OMP_NUM_THREADS", "default")
    bind = " ".join(f"{k}={environ[k]}" for k in (*BIND_VARS, *KMP_WAIT) if k in environ) or "unbound"
    state = "tuned" if TUNED_MARKER in environ else "as started (runtime tuning off or not on CPU)"
    huge = "on" if environ.get("THP_MEM_ALLOC_ENABLE") == "1" else f"off (THP mode {thp_mode()})"
    return (f"CPU runtime {state}: allocator {allocator}; {openmp}; OMP threads {threads}, binding {bind}; "
            f"huge pages for tensors {huge}")  # fmt: skip
