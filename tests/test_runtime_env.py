"""The CPU runtime set-up of ``loraplex serve`` (server/runtime_env.py): what it finds, what it plans,
that the user's own settings win, that it re-executes once and can be turned off, and what it logs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from server import runtime_env
from server.runtime_env import Pieces, describe, loaded_libraries, plan, tuned_environ

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def libs(tmp_path) -> list[Path]:
    """Two library dirs with fake tcmalloc, jemalloc, LLVM and Intel OpenMP files (the plan only
    looks for files; nothing is loaded)."""
    system, venv = tmp_path / "system", tmp_path / "venv"
    for d, names in {system: ["libjemalloc.so.2", "libtcmalloc_minimal.so.4", "libomp.so.5"],
                     venv: ["libiomp5.so"]}.items():  # fmt: skip
        d.mkdir()
        for n in names:
            (d / n).write_bytes(b"")
    return [system, venv]


def test_plan_prefers_tcmalloc_and_intel_openmp_and_binds_one_thread_per_usable_cpu(libs):
    p = plan({}, dirs=libs)
    assert p.allocator == ("tcmalloc", libs[0] / "libtcmalloc_minimal.so.4")
    assert p.openmp == ("intel", libs[1] / "libiomp5.so")
    assert p.env["LD_PRELOAD"] == f"{libs[0] / 'libtcmalloc_minimal.so.4'}:{libs[1] / 'libiomp5.so'}"
    assert p.env["OMP_NUM_THREADS"] == str(len(os.sched_getaffinity(0)))
    # Intel's and LLVM's runtimes bind a team started off the main thread only by KMP_AFFINITY
    assert p.env["KMP_AFFINITY"] == "granularity=fine,compact,1,0" and "OMP_PROC_BIND" not in p.env
    assert p.env["KMP_BLOCKTIME"] == "1"  # its threads stop spinning 1 ms after a parallel region


def test_torchs_own_gnu_openmp_is_bound_the_standard_way(libs):
    p = plan({}, Pieces(openmp=None), dirs=libs)
    assert (p.env["OMP_PROC_BIND"], p.env["OMP_PLACES"]) == ("close", "cores") and "KMP_AFFINITY" not in p.env
    # an OpenMP runtime the user preloads is recognised as one
    assert "KMP_AFFINITY" in plan({"LD_PRELOAD": "/opt/intel/libiomp5.so"}, dirs=[]).env


def test_plan_falls_back_and_skips_what_is_missing(libs, tmp_path):
    (libs[0] / "libtcmalloc_minimal.so.4").unlink()
    p = plan({}, dirs=[libs[0]])
    assert p.allocator[0] == "jemalloc" and p.openmp[0] == "llvm"
    bare = plan({}, dirs=[tmp_path / "nothing"])
    assert bare.allocator is None and bare.openmp is None and "LD_PRELOAD" not in bare.env
    assert bare.env["OMP_NUM_THREADS"]  # threads and binding need no library


def test_the_users_own_settings_win(libs):
    environ = {"LD_PRELOAD": "/opt/libjemalloc.so.2", "OMP_NUM_THREADS": "1", "OMP_PROC_BIND": "false"}
    p = plan(environ, dirs=libs)
    assert p.allocator is None  # an allocator is already preloaded: no second one
    assert p.env == {
        "LD_PRELOAD": f"{libs[1] / 'libiomp5.so'}:/opt/libjemalloc.so.2",
        "KMP_BLOCKTIME": "1",  # the preloaded runtime's spin-wait, which the user did not set
    }  # no threads, no binding
    assert "KMP_BLOCKTIME" not in plan({**environ, "KMP_BLOCKTIME": "200"}, dirs=libs).env
    assert "THP_MEM_ALLOC_ENABLE" not in plan({"THP_MEM_ALLOC_ENABLE": "0"}, Pieces(huge_pages=True), dirs=libs,
                                              thp="always").env  # fmt: skip


@pytest.mark.parametrize("mode, planned", [("madvise", True), ("always", True), ("never", False)])
def test_huge_pages_are_a_piece_to_ask_for_where_the_kernel_gives_them(libs, mode, planned):
    assert ("THP_MEM_ALLOC_ENABLE" in plan({}, Pieces(huge_pages=True), dirs=libs, thp=mode).env) is planned
    assert "THP_MEM_ALLOC_ENABLE" not in plan({}, dirs=libs, thp=mode).env  # not by default: ~1 s of start-up


def test_the_thp_mode_is_the_bracketed_word(tmp_path):
    enabled = tmp_path / "enabled"
    enabled.write_text("always [madvise] never\n")
    assert runtime_env.thp_mode(enabled) == "madvise"
    assert runtime_env.thp_mode(tmp_path / "absent") is None


def test_huge_pages_back_large_tensors_in_a_tuned_process():
    """A real process: torch's allocator madvises a 64 MB tensor into huge pages (where THP is on)."""
    if runtime_env.thp_mode() not in ("always", "madvise"):
        pytest.skip("transparent huge pages are off on this machine")
    code = (
        "import torch; x = torch.ones(16 * 2**20); "
        "print([l.split()[1] for l in open('/proc/self/smaps_rollup') if l.startswith('AnonHugePages')][0])"
    )
    env = {**os.environ, **runtime_env.HUGE_PAGES}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) >= 32 * 1024  # kB: at least half of the tensor


def test_each_piece_can_be_left_out(libs):
    p = plan({}, Pieces(allocator="jemalloc", openmp=None, threads=False, bind=False), dirs=libs)
    assert p.env == {"LD_PRELOAD": str(libs[0] / "libjemalloc.so.2")}
    env = tuned_environ({"PATH": "/bin"}, Pieces(allocator=None, openmp="llvm", bind=False), libs)
    assert env["LD_PRELOAD"] == str(libs[0] / "libomp.so.5") and env["PATH"] == "/bin"
    assert env[runtime_env.TUNED_MARKER] == ",".join(map(str, sorted(os.sched_getaffinity(0))))


def test_a_cgroup_quota_caps_the_thread_count(tmp_path, monkeypatch):
    quota = tmp_path / "cpu.max"
    quota.write_text("50000 100000\n")
    assert runtime_env._cgroup_cpu_quota(quota) == 0.5
    quota.write_text("max 100000\n")
    assert runtime_env._cgroup_cpu_quota(quota) is None
    monkeypatch.setattr(runtime_env, "_cgroup_cpu_quota", lambda _: 1.5)
    monkeypatch.setattr(runtime_env.os, "sched_getaffinity", lambda _: {0, 1, 2, 3})
    assert runtime_env.usable_cpus() == (0, 1)


def test_loaded_libraries_and_the_start_up_line(tmp_path):
    maps = tmp_path / "maps"
    maps.write_text(
        "7f00-7f01 r-xp 00000000 fd:01 1 /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4.5.10\n"
        "7f02-7f03 r-xp 00000000 fd:01 2 /venv/lib/python3.11/site-packages/torch/lib/libgomp-a34b3233.so.1\n"
        "7f04-7f05 r-xp 00000000 fd:01 3 /usr/lib/llvm-14/lib/libomptarget.so\n"
        "7f06-7f07 rw-p 00000000 00:00 0 [heap]\n"
    )
    loaded = loaded_libraries(maps)
    assert loaded == {"tcmalloc": "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4.5.10",
                      "gnu": "/venv/lib/python3.11/site-packages/torch/lib/libgomp-a34b3233.so.1"}  # fmt: skip
    environ = {
        "OMP_NUM_THREADS": "2",
        "OMP_PROC_BIND": "close",
        "OMP_PLACES": "cores",
        runtime_env.TUNED_MARKER: "0",
    }
    line = describe(loaded, environ)
    assert line.startswith("CPU runtime tuned: allocator tcmalloc (") and "gnu OpenMP" in line
    assert "apt-get install libomp5-14" in line  # says how to get a faster OpenMP runtime
    assert "OMP threads 2, binding OMP_PROC_BIND=close OMP_PLACES=cores; huge pages for tensors off" in line
    assert describe(loaded, {**environ, "THP_MEM_ALLOC_ENABLE": "1"}).endswith("huge pages for tensors on")
    bare = describe({}, {})
    assert "glibc malloc (apt-get install libtcmalloc-minimal4" in bare and "tuning off" in bare


def test_only_cpu_serving_is_tuned(monkeypatch):
    assert runtime_env.serves_on_cpu("cpu")
    assert not runtime_env.serves_on_cpu("cuda:0")
    calls = []
    monkeypatch.setattr(runtime_env.os, "execve", lambda *a: calls.append(a))
    monkeypatch.delenv(runtime_env.TUNED_MARKER, raising=False)
    runtime_env.reexec_if_needed(False, "cpu")  # opted out
    runtime_env.reexec_if_needed(True, "cuda")
    assert calls == []
    runtime_env.reexec_if_needed(True, "cpu")
    assert calls and calls[0][0] == sys.executable and runtime_env.TUNED_MARKER in calls[0][2]
    monkeypatch.setenv(runtime_env.TUNED_MARKER, "0")
    runtime_env.reexec_if_needed(True, "cpu")  # already re-executed: never loops
    assert len(calls) == 1


_SHOW = (
    "from server import runtime_env as r; import os; "
    "print(os.environ.get(r.TUNED_MARKER), any(v in os.environ for v in r.BIND_VARS))"
)


@pytest.mark.parametrize("tuning, expect", [(True, "0"), (False, "None False")])
def test_the_process_re_executes_itself_once_unless_opted_out(tuning, expect):
    """A real exec: the child re-runs the same command line with the planned environment."""
    code = f"from server import runtime_env as r; r.reexec_if_needed({tuning}, 'cpu'); {_SHOW}"
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "KMP_", "GOMP_", "LORAPLEX_RUNTIME"))
    }
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith(expect)
    if tuning:
        assert out.stdout.split()[1] == "True"
