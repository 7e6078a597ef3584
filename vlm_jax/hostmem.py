"""Host memory: large allocations on transparent huge pages (glibc).

XLA's CPU runtime allocates each execution's temporaries afresh (the default
train step's are 224 MiB) and frees them at the end; glibc maps a block that
large with ``mmap`` and unmaps it on free, so every step touches fresh
memory and faults it in page by page: 4 KiB pages, about 57,000 faults and
224 MiB zeroed by the kernel per step; about a quarter of the default run's
CPU time went to the kernel on the 2-core machine (docs/benchmarks.md).
Where the kernel gives huge pages to regions that ask for them
(``/sys/kernel/mm/transparent_hugepage/enabled`` is ``madvise``, a common
default), glibc's tunable ``glibc.malloc.hugetlb=1`` (glibc ≥ 2.35) makes
malloc ask for them on its mappings: a 64 MiB block then faults 544 times
instead of 16,385. The default train step then took 223 ms against 301
(medians of five alternating pairs of processes).

glibc reads its tunables once, when the process starts, so the command-line
entry points re-execute themselves with ``GLIBC_TUNABLES`` set before they
import anything heavy (``reexec_with_huge_pages``). That changes how memory
is obtained, never a value. Nothing happens off Linux or glibc, on an older
glibc, when the kernel gives huge pages always or never (nothing to gain),
when ``GLIBC_TUNABLES`` is already set (the user's choice stands, and the
re-executed process sees it and goes on), or when ``VLM_JAX_HUGE_PAGES=0``.
"""

from __future__ import annotations

import os
import platform
import sys
from typing import Mapping

TUNABLE = "glibc.malloc.hugetlb=1"
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"
MIN_GLIBC = (2, 35)  # the first glibc with glibc.malloc.hugetlb


def thp_mode(path: str = THP_MODE_FILE) -> str:
    """The kernel's transparent-huge-page mode ("always", "madvise", "never"),
    the bracketed word of ``path``; "" when it cannot be read."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return ""
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else ""


def _glibc_version() -> tuple[int, ...]:
    name, version = platform.libc_ver()
    if name != "glibc":
        return ()
    try:
        return tuple(int(part) for part in version.split("."))
    except ValueError:
        return ()


def huge_page_environment(environ: Mapping[str, str], system: str, glibc: tuple[int, ...],
                          mode: str) -> dict[str, str] | None:
    """The environment to re-execute with, or None when there is nothing to do."""
    if system != "Linux" or glibc < MIN_GLIBC or mode != "madvise":  # () (not glibc) sorts below any version
        return None
    if "GLIBC_TUNABLES" in environ or environ.get("VLM_JAX_HUGE_PAGES") == "0":
        return None
    return {**environ, "GLIBC_TUNABLES": TUNABLE}


def reexec_with_huge_pages() -> None:
    """Replaces this process by itself, the same command line, with the
    huge-page tunable set, when ``huge_page_environment`` says so; returns
    otherwise. Call it first thing in a ``__main__`` block: the process id,
    arguments and working directory stay the same."""
    env = huge_page_environment(os.environ, platform.system(), _glibc_version(), thp_mode())
    if env is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, sys.orig_argv, env)
