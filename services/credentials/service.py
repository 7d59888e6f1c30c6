"""The credential manager: API keys kept encrypted on the host, never handed to the bus.

Its RPCs are for the operator (and host services): they add, rotate, describe and remove secrets
and rotate the master key, and none returns a value. Values leave the store only inside this
process, through the service's SecretSource face (`secret_for`, `mark_used`): the egress proxy,
which runs here, injects them into upstream requests.

Background work: last-use times are written in batches, retired versions erased once their grace
period is over, each expiry announced once as `credential.expired`, and the egress usage of sessions
deleted while the service was down (their `session.deleted` never reached it) pruned.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from typing import Callable, Iterator

from baaaht.bus.background import background
from baaaht.bus.callers import host_callers_only
from baaaht.bus.client import BusClient
from baaaht.bus.errors import BusError, invalid, not_found
from baaaht.bus.peers import Peer
from baaaht.bus.service import CallContext, Publisher, Service, on_event, rpc
from baaaht.schemas.base import Empty
from baaaht.schemas.config import Config, CredentialsConfig
from baaaht.schemas.credentials import (
    CredentialChanged,
    CredentialDelete,
    CredentialDescribe,
    CredentialExpired,
    CredentialInfo,
    CredentialList,
    CredentialMasterRotated,
    CredentialPage,
    CredentialPut,
    CredentialRotate,
    CredentialRotateMaster,
    CredentialRotateMasterResult,
)
from baaaht.schemas.egress import CredentialUsage, CredentialUsageResult
from baaaht.schemas.errors import ErrorCode
from baaaht.schemas.sessions import SessionDeleted
from baaaht.services.credentials.egress.server import EgressError, EgressServer
from baaaht.services.credentials.hardening import keep_secrets_in_process
from baaaht.services.credentials.master import KeyFile, MasterSource, Passphrase
from baaaht.services.credentials.source import Secret, SecretExpired, SecretNotFound, SecretSource
from baaaht.services.credentials.store import CredentialExists, CredentialStore, StoreRefused

log = logging.getLogger("baaaht.credential")


def master_source(config: CredentialsConfig) -> MasterSource:
    """A passphrase when one is configured (from a file or an environment variable), else the key file."""
    if config.passphrase_file:
        return Passphrase.from_file(config.passphrase_file)
    if config.passphrase_env:
        return Passphrase.from_env(config.passphrase_env)
    return KeyFile(config.master_key_file)


def check_value(kind: str, value: bytes) -> None:
    """A value the proxy can inject as it is: one header line's worth, `user:password` for basic."""
    if any(byte < 0x20 or byte == 0x7F for byte in value):
        raise invalid(
            "the value holds a control character (a line break, say): it could not go into a header"
        )
    if kind == "basic" and b":" not in value:
        raise invalid("a basic credential's value is `user:password` (no ':' found)")


@contextmanager
def store_errors() -> Iterator[None]:
    """The store's errors as the bus codes a caller acts on (the store knows nothing of the bus)."""
    try:
        yield
    except SecretNotFound as exc:
        raise not_found(exc.message, name=exc.name) from None
    except CredentialExists as exc:
        raise BusError(ErrorCode.ALREADY_EXISTS, str(exc), {"name": exc.name}) from None


@host_callers_only  # agents use secrets only through the proxy (and the broker refuses them first)
class CredentialService(Service):
    name = "credential"

    def __init__(
        self,
        store: CredentialStore,
        config: Config,
        *,
        events: Publisher,
        sessions: Peer,
        clock: Callable[[], float] = time.time,
        egress: Callable[[SecretSource], EgressServer] | None = None,
    ):
        self.store = store
        self.settings = config.credentials
        self.events = events
        self.sessions = sessions
        self.clock = clock
        self._unconfirmed: set[str] | None = (
            None  # sessions with usage at the first sweep, not yet asked about
        )
        # The egress proxy serves agents from this process, with this service as its SecretSource.
        self.egress = egress(self) if egress is not None else None

    @classmethod
    def from_config(cls, config: Config, bus: BusClient) -> "CredentialService":
        keep_secrets_in_process()  # this is the service's own process: before any key is read
        try:
            store = CredentialStore.open(config.data_dir, master_source(config.credentials))
        except StoreRefused as exc:
            log.error("refusing to start", extra={"reason": str(exc)})
            raise SystemExit(f"credential: refusing to start: {exc}") from None
        return cls(
            store,
            config,
            events=bus,
            sessions=Peer(bus, "session", timeout=float(config.bus.call_timeout)),
            egress=lambda secrets: EgressServer.for_config(config, secrets, bus),
        )

    def on_start(self) -> None:
        if self.egress is not None:
            try:
                self.egress.start()
            except (EgressError, OSError) as exc:
                log.error("refusing to start", extra={"reason": str(exc)})
                raise SystemExit(f"credential: the egress proxy cannot start: {exc}") from None

    def on_stop(self) -> None:
        if self.egress is not None:
            self.egress.stop()  # calls in flight end, their audit lines are written
        self.store.close()

    # -- the in-process SecretSource (for the egress proxy) -------------------------------------

    def secret_for(self, name: str) -> Secret:
        try:
            return self.store.secret_for(name)
        except SecretExpired:
            self.announce_expired()
            raise

    def mark_used(self, name: str) -> None:
        self.store.mark_used(name)

    # -- RPCs -----------------------------------------------------------------------------------

    @rpc
    def put(self, req: CredentialPut, ctx: CallContext) -> CredentialInfo:
        check_value(req.kind, req.value)
        with store_errors():
            info = self.store.put(req.name, req.kind, req.value, req.description, req.expires_at)
        log.info("credential added", extra={"credential": req.name, "kind": req.kind})
        self.events.publish(
            CredentialChanged(id=info.id, name=info.name, change="added", version=info.version)
        )
        return info

    @rpc
    def list(self, req: CredentialList, ctx: CallContext) -> CredentialPage:
        credentials, next_cursor = self.store.list(req.limit, req.cursor)
        return CredentialPage(credentials=credentials, next_cursor=next_cursor)

    @rpc
    def describe(self, req: CredentialDescribe, ctx: CallContext) -> CredentialInfo:
        with store_errors():
            return self.store.describe(req.name)

    @rpc
    def rotate(self, req: CredentialRotate, ctx: CallContext) -> CredentialInfo:
        with store_errors():
            kind = self.store.describe(req.name).kind
            check_value(kind, req.value)
            grace = float(self.settings.grace_period) if req.grace is None else req.grace
            info = self.store.rotate(req.name, req.value, req.expires_at, grace)
        log.info("credential rotated", extra={"credential": req.name, "version": info.version})
        self.events.publish(
            CredentialChanged(id=info.id, name=info.name, change="rotated", version=info.version)
        )
        return info

    @rpc
    def delete(self, req: CredentialDelete, ctx: CallContext) -> Empty:
        with store_errors():
            secret_id = self.store.delete(req.name)
        log.info("credential deleted", extra={"credential": req.name})
        self.events.publish(CredentialChanged(id=secret_id, name=req.name, change="deleted"))
        return Empty()

    @rpc
    def usage(self, req: CredentialUsage, ctx: CallContext) -> CredentialUsageResult:
        """Egress usage per session (the proxy runs here; the totals are kept across restarts)."""
        if self.egress is None:
            return CredentialUsageResult()
        return self.egress.usage(req)

    @on_event("session.deleted")
    def on_session_deleted(self, event: SessionDeleted) -> None:
        """Its egress usage totals go with it: credential.usage shows it no more, its row is deleted."""
        if self.egress is not None:
            self.egress.forget_session(event.session_id)

    @rpc
    def rotate_master(self, req: CredentialRotateMaster, ctx: CallContext) -> CredentialRotateMasterResult:
        rewrapped = self.store.rotate_master()
        source = self.store.master.source
        self.events.publish(CredentialMasterRotated(rewrapped=rewrapped, source=source))
        return CredentialRotateMasterResult(rewrapped=rewrapped, source=source, rotated_at=self.clock())

    # -- background -----------------------------------------------------------------------------

    @background(every=lambda self: float(self.settings.sweep_interval))
    def sweep(self) -> None:
        self.store.flush_usage()
        for name, version in self.store.erase_retired():
            log.info("retired version erased", extra={"credential": name, "version": version})
        self.announce_expired()
        self.prune_deleted_sessions()

    def prune_deleted_sessions(self) -> None:
        """Each session that had usage at the first sweep is asked about once: one the session service no
        longer has was deleted while this service was down, and its usage goes as session.deleted would
        have taken it. Until the session service answers, the next sweep asks again."""
        if self.egress is None:
            return
        if self._unconfirmed is None:
            self._unconfirmed = {usage.session_id for usage in self.egress.usage(CredentialUsage()).sessions}
        for session_id in sorted(self._unconfirmed):
            try:
                self.sessions.get(None, session_id=session_id)
            except BusError as error:
                if error.code is not ErrorCode.NOT_FOUND or error.details.get("session_id") != session_id:
                    log.info(
                        "the session service cannot say which sessions exist", extra={"reason": error.message}
                    )
                    return
                log.info("a session was deleted while the service was down", extra={"session_id": session_id})
                self.egress.forget_session(session_id)
            self._unconfirmed.discard(session_id)

    def announce_expired(self) -> None:
        for secret_id, name, expires_at in self.store.announce_expired():
            log.info("credential expired", extra={"credential": name})
            self.events.publish(CredentialExpired(id=secret_id, name=name, expires_at=expires_at))
