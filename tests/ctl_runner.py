"""Running the real `baaaht-ctl` app against a test host: in-process with Typer's CliRunner, or as the
installed console script in its own process."""

from __future__ import annotations

import itertools
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Callable

from typer.testing import CliRunner

from baaaht.bus.testing import Recorded
from baaaht.ctl.main import app

CTL = str(Path(sys.executable).parent / "baaaht-ctl")


def host_args(host) -> list[str]:
    # --run-dir as well: a BAAAHT_RUN_DIR in the test's environment must not pick another host.
    return ["--config", str(host.config_path), "--run-dir", host.run_dir]


def invoke_app(args: list[str], expect: int | None = None, stdin: str | None = None):
    """baaaht-ctl in this process; `expect=None` takes any exit code."""
    result = CliRunner().invoke(app, args, input=stdin)
    if expect is not None:
        assert result.exit_code == expect, (result.exit_code, result.output, result.exception)
    return result


def invoke(host, *args: str, json: bool = False, expect: int | None = 0, stdin: str | None = None):
    """baaaht-ctl in this process against `host`, with `--json` when `json`."""
    return invoke_app([*host_args(host), *args, *(["--json"] if json else [])], expect, stdin)


def run(host, *args: str, timeout: float = 60, stdin: str | None = None) -> subprocess.CompletedProcess:
    """The console script in its own process (fed `stdin`)."""
    return subprocess.run(
        [CTL, *host_args(host), *args], capture_output=True, text=True, timeout=timeout, input=stdin
    )


def popen(host, *args: str) -> subprocess.Popen:
    """The console script, left running (Ctrl-C it with SIGINT, whatever this process ignores)."""
    return subprocess.Popen(
        [CTL, *host_args(host), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def line_reader(process: subprocess.Popen, what: str) -> Callable[[], str]:
    """A function that returns the process's next line of stdout, waiting for it (bounded)."""
    printed: Recorded[str] = Recorded()
    threading.Thread(target=lambda: [printed.append(line) for line in process.stdout], daemon=True).start()
    position = itertools.count()

    def next_line() -> str:
        index = next(position)
        return printed.wait_for_count(index + 1, what=what)[index]  # woken by the line, not polled

    return next_line


def stderr_once_ended(process: subprocess.Popen, timeout: float = 15) -> str:
    """What the process wrote to stderr, once it has ended (within `timeout` seconds)."""
    process.wait(timeout)
    return process.stderr.read()


def reap(process: subprocess.Popen) -> None:
    """Kill the process if it still runs, and close its pipes."""
    if process.poll() is None:
        process.kill()
        process.wait(5)
    process.stdout.close()
    process.stderr.close()
