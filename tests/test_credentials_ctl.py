"""`baaaht-ctl credentials add` at a real terminal: the value is asked twice and never echoed."""

from __future__ import annotations

import os
import select
import subprocess
import time

import pytest

from baaaht.bus.testing import code_of
from baaaht.schemas.credentials import CredentialDescribe
from baaaht.schemas.errors import ErrorCode
from tests import ctl_runner
from tests.test_credentials_bus import NAME, SERVICE

PROMPT_TIMEOUT = 30.0


@pytest.fixture
def credential_host(host):
    host.start_service(SERVICE, NAME)
    return host


class Terminal:
    """A child process on a pseudo-terminal that is its controlling terminal (as getpass needs)."""

    def __init__(self, argv: list[str]):
        self.master, replica = os.openpty()
        self.process = subprocess.Popen(
            argv,
            stdin=replica,
            stdout=replica,
            stderr=replica,
            pass_fds=(replica,),
            preexec_fn=lambda: os.login_tty(replica),
        )
        os.close(replica)
        self.shown = b""

    def read_until(self, text: bytes) -> None:
        deadline = time.monotonic() + PROMPT_TIMEOUT
        while text not in self.shown:
            left = deadline - time.monotonic()
            assert left > 0, f"no {text!r} on the terminal; it shows {self.shown!r}"
            if select.select([self.master], [], [], left)[0]:
                self.shown += self._read()

    def _read(self) -> bytes:
        try:
            return os.read(self.master, 4096)
        except OSError:  # EIO: the child closed the terminal
            return b""

    def type(self, text: bytes) -> None:
        os.write(self.master, text)

    def finish(self) -> int:
        code = self.process.wait(PROMPT_TIMEOUT)
        while select.select([self.master], [], [], 0)[0] and (more := self._read()):
            self.shown += more
        os.close(self.master)
        return code


def test_add_prompts_twice_without_echo(credential_host):
    value = b"sk-typed-" + os.urandom(8).hex().encode()
    argv = [
        ctl_runner.CTL,
        *ctl_runner.host_args(credential_host),
        "credentials",
        "add",
        "typed",
        "--kind",
        "api-key",
    ]
    terminal = Terminal(argv)
    terminal.read_until(b"value (not echoed): ")
    terminal.type(value + b"\n")
    terminal.read_until(b"the same again: ")
    terminal.type(value + b"\n")
    assert terminal.finish() == 0, terminal.shown
    assert value not in terminal.shown and b"typed" in terminal.shown
    assert credential_host.client().call(CredentialDescribe(name="typed")).version == 1


def test_two_different_values_store_nothing(credential_host):
    argv = [
        ctl_runner.CTL,
        *ctl_runner.host_args(credential_host),
        "credentials",
        "add",
        "typo",
        "--kind",
        "api-key",
    ]
    terminal = Terminal(argv)
    terminal.read_until(b"value (not echoed): ")
    terminal.type(b"first\n")
    terminal.read_until(b"the same again: ")
    terminal.type(b"second\n")
    assert terminal.finish() == 1
    assert b"the two values differ: nothing was stored" in terminal.shown
    assert b"first" not in terminal.shown and b"second" not in terminal.shown
    assert (
        code_of(lambda: credential_host.client().call(CredentialDescribe(name="typo"))) is ErrorCode.NOT_FOUND
    )
