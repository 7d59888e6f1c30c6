"""The host and waits of the test kit (baaaht.bus.testing), under the name older tests import, and how
a launcher test starts a program with a chosen SIGINT disposition."""

import sys

from baaaht.bus.testing import Host, wait_for

__all__ = ["Host", "wait_for", "with_sigint"]

# Runs argv[2:] with SIGINT set to argv[1] (SIG_DFL or SIG_IGN): exec keeps a default or ignored disposition,
# so the program starts with it whatever this test process inherited (a suite run as a background job
# inherits SIGINT ignored).
_WITH_SIGINT = (
    "import os, signal, sys; signal.signal(signal.SIGINT, getattr(signal, sys.argv[1]));"
    " os.execvp(sys.argv[2], sys.argv[2:])"
)


def with_sigint(disposition: str, argv: list[str]) -> list[str]:
    """argv started with SIGINT "SIG_DFL" (as a foreground command in a terminal) or "SIG_IGN"."""
    return [sys.executable, "-c", _WITH_SIGINT, disposition, *argv]
