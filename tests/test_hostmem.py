"""vlm_jax.hostmem: when the entry points re-execute with glibc's huge-page tunable."""

import json
import os
import platform
import subprocess
import sys

import pytest

from vlm_jax import hostmem

GLIBC = (2, 36)


@pytest.mark.parametrize("environ,system,glibc,mode,expected", [
    ({}, "Linux", GLIBC, "madvise", hostmem.TUNABLE),
    ({"PATH": "/bin"}, "Linux", (2, 35), "madvise", hostmem.TUNABLE),
    ({}, "Linux", (2, 34), "madvise", None),  # no such tunable yet
    ({}, "Linux", (), "madvise", None),  # not glibc (musl)
    ({}, "Darwin", GLIBC, "madvise", None),
    ({}, "Linux", GLIBC, "always", None),  # huge pages already
    ({}, "Linux", GLIBC, "never", None),
    ({}, "Linux", GLIBC, "", None),  # no THP file
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=1"}, "Linux", GLIBC, "madvise", None),  # the user's choice, and no loop
    ({"VLM_JAX_HUGE_PAGES": "0"}, "Linux", GLIBC, "madvise", None),
])
def test_when_to_reexecute(environ, system, glibc, mode, expected):
    env = hostmem.huge_page_environment(environ, system, glibc, mode)
    if expected is None:
        assert env is None
    else:
        assert env == {**environ, "GLIBC_TUNABLES": expected}


def test_thp_mode_reads_the_bracketed_word(tmp_path):
    path = tmp_path / "enabled"
    path.write_text("always [madvise] never\n")
    assert hostmem.thp_mode(str(path)) == "madvise"
    path.write_text("[always] madvise never\n")
    assert hostmem.thp_mode(str(path)) == "always"
    assert hostmem.thp_mode(str(tmp_path / "missing")) == ""


# A child that re-executes as the entry points do, then counts the minor page
# faults of five 64 MiB malloc-and-fill cycles after a first one (C malloc, as
# XLA's runtime uses it; NumPy asks for huge pages by itself).
PROBE = r"""
import ctypes, json, os, resource
from vlm_jax import hostmem
hostmem.reexec_with_huge_pages()
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def cycle():
    p = libc.malloc(64 << 20)
    ctypes.memset(p, 1, 64 << 20)
    libc.free(p)
cycle()
f0 = faults()
for _ in range(5):
    cycle()
print(json.dumps({"pid": os.getpid(), "tunables": os.environ.get("GLIBC_TUNABLES"), "faults": (faults() - f0) / 5}))
"""


def _probe(**env) -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "VLM_JAX_HUGE_PAGES")}
    proc = subprocess.Popen([sys.executable, "-c", PROBE], env={**clean, **env}, stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0
    result = json.loads(out)
    assert result["pid"] == proc.pid  # exec keeps the process: signals and kill -9 reach the run itself
    return result


def test_reexecuted_process_faults_far_fewer_pages():
    active = hostmem.huge_page_environment({}, platform.system(), hostmem._glibc_version(), hostmem.thp_mode())
    off = _probe(VLM_JAX_HUGE_PAGES="0")
    assert off["tunables"] is None
    if active is None:
        pytest.skip("this system gives nothing to gain (not glibc >= 2.35 with THP in madvise mode)")
    on = _probe()
    assert on["tunables"] == hostmem.TUNABLE
    # 64 MiB in 4 KiB pages is 16,384 faults; in 2 MiB pages, 32.
    assert off["faults"] > 1000, off
    assert on["faults"] < 0.1 * off["faults"], (on, off)
