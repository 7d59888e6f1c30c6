"""A benchmark run on an ordinary disk's fsync: BENCH_FSYNC_DELAY_US=1000 re-executes the benchmark with
bench/slow_fsync.c preloaded (LD_PRELOAD), so that in the benchmark's process and in every process it
starts (they inherit the environment) each fsync(2) and fdatasync(2) sleeps that long and then flushes as
always. This VM's flush is nearly free, so a group commit's saving (one fsync for many writes) cannot
show on it; nothing but the time a flush takes changes. The shim is built with gcc once per version of
its source, into ~/.cache/baaaht-bench.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

SOURCE = Path(__file__).with_name("slow_fsync.c")
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "baaaht-bench"
SETTING = "BENCH_FSYNC_DELAY_US"


def delay_us() -> int:
    """The delay asked for (0: the disk's own fsync)."""
    text = os.environ.get(SETTING, "0")
    if not (text.isascii() and text.isdigit()):
        raise SystemExit(f"{SETTING}={text!r}: give a whole number of microseconds, 0 or more")
    return int(text)


def results_name(name: str) -> str:
    """A delayed run's results go to their own file, never over the disk's own run."""
    delay = delay_us()
    return f"{name}-fsync-{delay}us" if delay else name


def heading() -> str:
    """The first line of a benchmark's table: which fsync the figures were measured with."""
    delay = delay_us()
    if not delay:
        return "fsync: this disk's own"
    return f"fsync: this disk's own + {delay} us before each fsync/fdatasync ({SETTING}, bench/slow_fsync.c)"


def shim() -> Path:
    """The shared library built from slow_fsync.c (built once per version of the source)."""
    source = SOURCE.read_bytes()
    built = CACHE / f"slow_fsync-{hashlib.sha256(source).hexdigest()[:16]}.so"
    if not built.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        partial = built.with_name(f"{built.name}.{os.getpid()}.tmp")  # a parallel build never reads half
        command = [
            "gcc",
            "-shared",
            "-fPIC",
            "-O2",
            "-Wall",
            "-Werror",
            "-o",
            str(partial),
            str(SOURCE),
            "-ldl",
        ]
        subprocess.run(command, check=True, timeout=120)
        os.replace(partial, built)
    return built


def is_loaded(library: Path) -> bool:
    """Whether this process has `library` mapped (the dynamic loader preloaded it)."""
    return str(library) in Path("/proc/self/maps").read_text()


def run_under_delay() -> None:
    """With a delay asked for, re-execute this benchmark (same interpreter, same arguments) with the shim
    preloaded, unless this process already is that run. Call before the benchmark starts anything."""
    delay = delay_us()
    if not delay:
        return
    library = shim()
    if is_loaded(library):
        if os.environ.get("SLOW_FSYNC_US") != str(delay):
            raise SystemExit(
                f"the shim is loaded with SLOW_FSYNC_US={os.environ.get('SLOW_FSYNC_US')!r}, not {delay}"
            )
        return
    preload = os.environ.get("LD_PRELOAD", "")
    if str(library) in preload:
        raise SystemExit(f"LD_PRELOAD names {library} but the dynamic loader did not load it")
    env = {**os.environ, "SLOW_FSYNC_US": str(delay), "LD_PRELOAD": f"{library} {preload}".strip()}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
