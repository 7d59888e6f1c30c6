"""The proxy's socket and thread inside the credential service's process.

The socket is `<run_dir>/agent/egress.sock`, in the agents' directory (the only host directory
mounted into agent containers), of that directory's group (the broker's `bus.socket_group`), mode
0660 like the agents' bus socket. It is bound under a temporary name, given its group and mode, and
only then renamed into place and listened on, so no one connects to it with other permissions.
The proxy's event loop runs on its own thread; the service's handler threads never block it. The
loop is uvloop's (libuv, MagicStack, the loop aiohttp and uvicorn recommend): its TLS and transports
are compiled, where asyncio's are Python per record and per write, which is most of what the proxy
spends on a streamed body (py-spy on the egress bench).
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading

import uvloop

from baaaht.bus.service import Publisher
from baaaht.common.audit_chain import AuditLog
from baaaht.common.endpoints import Endpoints
from baaaht.schemas.config import Config
from baaaht.schemas.egress import CredentialUsage, CredentialUsageResult
from baaaht.services.credentials.source import SecretSource

from .budgets import Budgets
from .callers import Callers, HostCallers
from .journal import VERIFY_HINT, Journal, audit_path
from .proxy import EgressProxy
from .usage_store import UsageSaver, UsageStoreError, usage_path

SOCKET_NAME = "egress.sock"
START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0
BACKLOG = 512


class EgressError(RuntimeError):
    """The proxy cannot start; the message says why and what to do."""


def bind_socket(agent_dir: str) -> socket.socket:
    try:
        gid = os.stat(agent_dir).st_gid
    except FileNotFoundError:
        raise EgressError(
            f"the agents' directory {agent_dir} does not exist (is the broker running?)"
        ) from None
    path = os.path.join(agent_dir, SOCKET_NAME)
    temporary = f"{path}.{os.getpid()}.new"
    if os.path.lexists(temporary):
        os.unlink(temporary)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(temporary)
        os.chown(temporary, -1, gid)
        os.chmod(temporary, 0o660)
        os.replace(temporary, path)
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        if os.path.lexists(temporary):
            os.unlink(temporary)
        raise
    return sock


class EgressServer:
    """Runs an EgressProxy on its own thread and event loop; `start` returns once it listens."""

    def __init__(self, proxy: EgressProxy, journal: Journal, agent_dir: str, saver: UsageSaver):
        self.proxy = proxy
        self.journal = journal
        self.saver = saver
        self.path = os.path.join(agent_dir, SOCKET_NAME)
        self.agent_dir = agent_dir
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._inode: int | None = None

    @classmethod
    def for_config(
        cls, config: Config, secrets: SecretSource, events: Publisher, callers: Callers | None = None
    ) -> "EgressServer":
        endpoints = Endpoints.for_config(config.bus)
        egress = config.egress
        journal = Journal(AuditLog(audit_path(config.data_dir), verify_hint=VERIFY_HINT), events)
        budgets = Budgets(egress.session_requests, egress.session_tokens)
        proxy = EgressProxy(
            egress,
            callers=callers or HostCallers(endpoints.run_dir),
            secrets=secrets,
            journal=journal,
            budgets=budgets,
        )
        return cls(proxy, journal, endpoints.agent_dir, UsageSaver(budgets, usage_path(config.data_dir)))

    def start(self) -> None:
        try:
            self.saver.start()  # the sessions' totals so far, before the first call is counted
        except UsageStoreError as error:
            raise EgressError(str(error)) from None
        try:
            self._serve()
        except BaseException:
            self.saver.stop()
            raise

    def _serve(self) -> None:
        sock = bind_socket(self.agent_dir)
        self._inode = os.stat(self.path).st_ino
        started = threading.Event()
        failure: list[BaseException] = []
        loop = self._loop = uvloop.new_event_loop()

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self.proxy.start(sock))
            except BaseException as error:  # handed to start(), which raises it
                sock.close()
                failure.append(error)
                started.set()
                loop.close()
                return
            started.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(self.proxy.close())
                loop.close()

        self._thread = threading.Thread(target=run, name="egress-proxy", daemon=True)
        self._thread.start()
        if not started.wait(START_TIMEOUT):
            raise EgressError(f"the egress proxy did not start within {START_TIMEOUT:.0f}s")
        if failure:
            self._remove_socket()
            raise EgressError(f"the egress proxy did not start: {failure[0]}") from failure[0]

    def stop(self) -> None:
        """Stop serving (calls in flight get up to the site's shutdown timeout), then write what
        the journal still holds."""
        if self._thread is not None and self._loop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(STOP_TIMEOUT)
        self._remove_socket()
        self.saver.stop()
        self.journal.close()
        self.journal.audit.close()

    def usage(self, request: CredentialUsage) -> CredentialUsageResult:
        return CredentialUsageResult(sessions=self.proxy.budgets.sessions(request.session_id))

    def forget_session(self, session_id: str) -> None:
        """A deleted session's usage totals go with it."""
        self.saver.forget(session_id)

    def _remove_socket(self) -> None:
        """Only our own socket: a newer instance may have put its own in place."""
        try:
            if self._inode is not None and os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)
        except FileNotFoundError:
            pass
