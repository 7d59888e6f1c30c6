"""Unguessable ids for tasks, leases and schedules: 128 bits of the OS's CSPRNG each, as hex.

Drawn from the OS 256 at a time: a getrandom(2) per id was a tenth of the engine thread's time under
load (every task takes two ids, its own and its lease's). One RandomIds belongs to one thread (the
engine's): it takes no lock.
"""

from __future__ import annotations

import os

ID_BYTES = 16
BATCH = 256  # ids drawn from the OS at once


class RandomIds:
    def __init__(self, urandom=os.urandom):
        self._urandom = urandom
        self._pool = b""
        self._at = 0

    def __call__(self) -> str:
        if self._at >= len(self._pool):
            self._pool, self._at = self._urandom(ID_BYTES * BATCH), 0
        start = self._at
        self._at += ID_BYTES
        return self._pool[start : self._at].hex()
