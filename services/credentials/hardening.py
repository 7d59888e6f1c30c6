"""The credential process keeps what it decrypts to itself: no core file, and no same-user reader.

Called first thing in the credential service's process, before the master key or a secret is read:
the core file size limit goes to 0 (a crash writes no file holding decrypted keys), and the process is
made non-dumpable (prctl PR_SET_DUMPABLE 0), which also makes its /proc/<pid>/environ and mem readable
by root alone, not by the other services that run as the same user (the passphrase variable of
credentials.passphrase_env sits in that environment). Linux only, as the host is.
"""

from __future__ import annotations

import ctypes
import os
import resource

PR_SET_DUMPABLE = 4
PR_GET_DUMPABLE = 3


class HardeningError(RuntimeError):
    pass


def _prctl(option: int, value: int = 0) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    result = libc.prctl(
        option, ctypes.c_ulong(value), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0)
    )
    if result < 0:
        error = ctypes.get_errno()
        raise HardeningError(f"prctl({option}) failed: {os.strerror(error)}")
    return result


def keep_secrets_in_process() -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    _prctl(PR_SET_DUMPABLE, 0)


def is_dumpable() -> bool:
    return _prctl(PR_GET_DUMPABLE) != 0
