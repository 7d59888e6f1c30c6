"""The benchmarks' slow-disk shim (bench/slow_fsync.c, bench/slow_disk.py): each fsync and fdatasync waits
the delay and then still makes the real call, and a benchmark run with BENCH_FSYNC_DELAY_US re-executes
itself with the shim loaded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
DELAY_US = 20_000  # far above this VM's own flush, so that the time it adds is plain


@pytest.fixture
def slow_disk(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(BENCH))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("BENCH_FSYNC_DELAY_US", raising=False)
    import slow_disk

    monkeypatch.setattr(slow_disk, "CACHE", tmp_path / "cache" / "baaaht-bench")
    return slow_disk


def run_python(code: str, env: dict, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


FLUSHES = """
    import errno, os, sys, time
    with open(sys.argv[1], "wb") as stream:
        stream.write(b"x")
        began = time.monotonic()
        for _ in range(5):
            os.fsync(stream.fileno())
            os.fdatasync(stream.fileno())
        print(time.monotonic() - began)
    for flush in (os.fsync, os.fdatasync):
        try:
            flush(1_000_000)  # no such descriptor: only the real call says so
        except OSError as error:
            assert error.errno == errno.EBADF, error
        else:
            raise AssertionError(f"{flush.__name__} of a closed descriptor succeeded")
"""


def test_every_fsync_and_fdatasync_waits_the_delay_then_makes_the_real_call(slow_disk, tmp_path):
    env = {"LD_PRELOAD": str(slow_disk.shim()), "SLOW_FSYNC_US": str(DELAY_US)}
    took = float(run_python(FLUSHES, env, str(tmp_path / "file")))
    assert took >= 10 * DELAY_US / 1e6


def test_a_benchmark_with_a_delay_runs_again_with_the_shim_loaded_and_its_arguments(slow_disk, tmp_path):
    script = f"""
        import os, sys
        sys.path.insert(0, {str(BENCH)!r})
        import slow_disk
        slow_disk.run_under_delay()
        print(slow_disk.is_loaded(slow_disk.shim()), os.environ.get("SLOW_FSYNC_US"), sys.argv[1:])
    """
    cache = str(tmp_path / "cache")
    delayed = run_python(
        script, {"BENCH_FSYNC_DELAY_US": "1000", "XDG_CACHE_HOME": cache}, "--flag", "x"
    ).strip()
    assert delayed.split(maxsplit=2) == ["True", "1000", "['--flag', 'x']"]
    native = run_python(script, {"BENCH_FSYNC_DELAY_US": "0", "XDG_CACHE_HOME": cache}, "--flag", "x").strip()
    assert native.split(maxsplit=2) == ["False", "None", "['--flag', 'x']"]


def test_the_shim_is_built_once_per_version_of_its_source(slow_disk):
    built = slow_disk.shim()
    first = built.stat().st_mtime_ns
    assert slow_disk.shim() == built
    assert built.stat().st_mtime_ns == first
    assert list(built.parent.iterdir()) == [built]  # no partial build left behind


def test_a_delayed_runs_results_go_to_their_own_file(slow_disk, monkeypatch):
    assert slow_disk.results_name("sessions") == "sessions"
    monkeypatch.setenv("BENCH_FSYNC_DELAY_US", "1000")
    assert slow_disk.results_name("sessions") == "sessions-fsync-1000us"
    assert "1000 us" in slow_disk.heading()


@pytest.mark.parametrize("value", ["-5", "1.5", "1ms", ""])
def test_a_delay_that_is_not_whole_microseconds_is_refused(slow_disk, monkeypatch, value):
    monkeypatch.setenv("BENCH_FSYNC_DELAY_US", value)
    with pytest.raises(SystemExit, match="whole number of microseconds"):
        slow_disk.delay_us()


def test_a_benchmark_that_does_not_run_under_the_delay_refuses_it(slow_disk, monkeypatch):
    import machine

    monkeypatch.setenv("BENCH_FSYNC_DELAY_US", "1000")
    with pytest.raises(SystemExit, match="only bench/sessions.py and bench/scheduler.py"):
        machine.load_before()


def test_a_delayed_runs_results_name_their_delay(slow_disk, monkeypatch, tmp_path):
    import machine

    monkeypatch.setattr(machine, "RESULTS", tmp_path / "results")
    monkeypatch.setenv("BENCH_FSYNC_DELAY_US", "1000")
    machine.save("sessions", {"cpus": 2, "load_before": (0.0, 0.0, 0.0)}, {"rate": 1.0})
    saved = json.loads((tmp_path / "results" / "sessions-fsync-1000us.json").read_text())
    assert saved["fsync_delay_us"] == 1000
    assert saved["rate"] == 1.0
