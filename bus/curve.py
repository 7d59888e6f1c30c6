"""CurveZMQ on tcp://: the broker's key pair, the client keys the operator issued, and ZAP.

Local peers need no key: the kernel says who they are (docs/IDENTITY.md). A peer on another host
reaches the broker only over tcp://, and every TCP endpoint is a CURVE server: NULL is refused at the
greeting. The broker answers ZAP itself, from its own loop (the handler's socket is polled with the
others): a client key is let in only when the key registry holds it, unexpired, with a role that fits
the socket (host roles on the services and events sockets, agent roles on the agents socket). The
ZAP User-Id is the key's name; the broker reads it off the connection's first message and stamps
the key's role and session into the Caller.

Libzmq copies a socket's security options into an endpoint when it is bound, so the ipc:// endpoints,
bound first, stay NULL (their peers are identified by the kernel), and only the tcp:// ones are CURVE.
Every TCP socket gets its own ZAP domain: a socket with none would skip ZAP (pyzmq's
`configure_curve(domain="*")` only covers those, and a mismatch hangs silently), so the domains are
named here, once, and both sides bound the handshake with `HANDSHAKE_IVL`.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import msgspec
import zmq
from zmq.utils import z85

from baaaht.bus.errors import BusError
from baaaht.schemas.bus import BusAuthKeysIssue, KeyRecord
from baaaht.schemas.errors import ErrorCode

ZAP_ENDPOINT = "inproc://zeromq.zap.01"  # fixed by the ZAP specification (RFC 27)
ZAP_VERSION = b"1.0"
ZAP_BATCH = 256  # requests answered per wake-up before looking at the other sockets
KEY_DIR = "bus-keys"  # under the data directory, unless bus.key_dir says otherwise
SERVER_KEY_FILE = "server.key"
CLIENT_KEYS_FILE = "clients.json"

HOST_ROLES = frozenset({"service", "operator"})
AGENT_ROLES = frozenset({"agent", "assistant", "worker"})
# socket name -> (its ZAP domain, the key roles it lets in)
DOMAINS: dict[str, tuple[bytes, frozenset[str]]] = {
    "services": (b"baaaht.services", HOST_ROLES),
    "agents": (b"baaaht.agents", AGENT_ROLES),
    "events": (b"baaaht.events", HOST_ROLES),  # PUB sends everything: host peers only
}
_SOCKET_OF_DOMAIN = {domain: name for name, (domain, _roles) in DOMAINS.items()}

# Refusal reasons (BusAuthFailed.reason, BusStatsReport.auth_failed)
UNKNOWN_KEY = "unknown_key"
EXPIRED = "expired"
WRONG_SOCKET = "wrong_socket"
MECHANISM = "mechanism"
HANDSHAKE = "handshake"
REVOKED = "revoked"


class KeyFileError(Exception):
    """A key file that cannot be used (missing, unreadable by its mode, malformed)."""


# -- the decision -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Refusal:
    reason: str
    message: str


def judge(record: KeyRecord | None, socket_name: str, wall: float) -> Refusal | None:
    """Whether the holder of `record` (None: a key nobody issued) may connect to `socket_name` at
    Unix time `wall`; None lets it in."""
    if record is None:
        return Refusal(UNKNOWN_KEY, f"a client key nobody issued tried the {socket_name} socket")
    if record.expires_at and wall >= record.expires_at:
        return Refusal(EXPIRED, f"key {record.name!r} expired at {iso_time(record.expires_at)}")
    allowed = DOMAINS[socket_name][1]
    if record.role not in allowed:
        return Refusal(
            WRONG_SOCKET,
            f"key {record.name!r} (role {record.role}) may not use the {socket_name} socket "
            f"(it takes {', '.join(sorted(allowed))})",
        )
    return None


def check_issue(role: str, session: str) -> str | None:
    """What is wrong with a key for `role` in `session`, or None."""
    if role in AGENT_ROLES and not session:
        return f"a key for role {role} needs a session (--session): agents act in one session only"
    if role in HOST_ROLES and session:
        return f"a key for role {role} takes no session: host roles are not scoped to one"
    return None


def iso_time(wall: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(wall))


# -- files --------------------------------------------------------------------------------------


class ServerKeyFile(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    public_key: str
    secret_key: str


class ClientKeyFile(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """What `baaaht-ctl auth keys issue` writes for the key's holder (mode 0600): its key pair, the
    broker's public key, and what the key makes it."""

    name: str
    role: str
    session: str = ""
    public_key: str
    secret_key: str
    server_public_key: str
    expires_at: float = 0.0


encode_json = msgspec.json.Encoder().encode


class IssuedKeys(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The broker's file of client keys: those in force, and those revoked (refused as such)."""

    keys: list[KeyRecord] = []
    revoked: list[KeyRecord] = []


_issued = msgspec.json.Decoder(IssuedKeys)


def write_private(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically, readable by its owner only (0600 from the first byte)."""
    partial = path.with_name(path.name + ".partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(partial, path)


def read_private(path: Path, what: str) -> bytes:
    """A secret's file, refused when others may read it (as ssh refuses such a key)."""
    try:
        mode = path.stat().st_mode
        if mode & 0o077:
            raise KeyFileError(f"{what} {path} is readable by others (mode {mode & 0o777:o}): chmod 600 it")
        return path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"{what} {path}: {exc.strerror}") from None


def new_key_pair() -> tuple[str, str]:
    """(public, secret) Z85 text of a new CURVE key pair."""
    public, secret = zmq.curve_keypair()
    return public.decode(), secret.decode()


def load_or_create_server_key(key_dir: Path) -> ServerKeyFile:
    """The broker's key pair, made on the first start with TCP on and kept in `key_dir` (0700)."""
    key_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = key_dir / SERVER_KEY_FILE
    if not path.exists():
        public, secret = new_key_pair()
        write_private(path, encode_json(ServerKeyFile(public_key=public, secret_key=secret)))
    try:
        return msgspec.json.decode(read_private(path, "the broker's key file"), type=ServerKeyFile)
    except msgspec.DecodeError as exc:
        raise KeyFileError(f"the broker's key file {path} is malformed: {exc}") from None


def load_client_keys(path: str) -> ClientKeyFile:
    try:
        return msgspec.json.decode(read_private(Path(path), "the bus key file"), type=ClientKeyFile)
    except msgspec.DecodeError as exc:
        raise KeyFileError(f"the bus key file {path} is malformed: {exc}") from None


class KeyRegistry:
    """The issued client keys, by public key and by name, and the revoked ones by public key, kept in
    `<key_dir>/clients.json` (0600)."""

    def __init__(self, key_dir: Path):
        self.path = key_dir / CLIENT_KEYS_FILE
        self.by_public: dict[str, KeyRecord] = {}
        self.by_name: dict[str, KeyRecord] = {}
        self.revoked: dict[str, KeyRecord] = {}
        if self.path.exists():
            try:
                issued = _issued.decode(read_private(self.path, "the issued keys file"))
            except msgspec.DecodeError as exc:
                raise KeyFileError(f"the issued keys file {self.path} is malformed: {exc}") from None
            for record in issued.keys:
                self._index(record)
            self.revoked = {record.public_key: record for record in issued.revoked}

    def judge(
        self, public_key: str, socket_name: str, wall: float
    ) -> tuple[KeyRecord | None, Refusal | None]:
        """(the key's record, why its holder may not connect to `socket_name` now, or None)."""
        record = self.by_public.get(public_key)
        if record is None and (gone := self.revoked.get(public_key)) is not None:
            return gone, Refusal(REVOKED, f"key {gone.name!r} was revoked")
        return record, judge(record, socket_name, wall)

    def _index(self, record: KeyRecord) -> None:
        self.by_public[record.public_key] = record
        self.by_name[record.name] = record

    def issue(self, request: BusAuthKeysIssue, wall: float, server_public_key: str) -> KeyRecord:
        """Record a new key at Unix time `wall`; a name or a public key in use (or revoked, or the
        broker's own) is refused."""
        problem = check_issue(request.role, request.session)
        if problem:
            raise BusError(ErrorCode.INVALID_ARGUMENT, problem)
        if request.name in self.by_name:
            raise BusError(ErrorCode.ALREADY_EXISTS, f"a key named {request.name!r} exists (revoke it first)")
        holder = self.by_public.get(request.public_key) or self.revoked.get(request.public_key)
        if holder is not None or request.public_key == server_public_key:
            name = f"key {holder.name!r}'s" if holder is not None else "the broker's"
            raise BusError(
                ErrorCode.ALREADY_EXISTS, f"this public key is {name} already: make a new key pair"
            )
        record = KeyRecord(
            name=request.name,
            public_key=request.public_key,
            role=request.role,
            session=request.session,
            issued_at=wall,
            expires_at=wall + request.ttl if request.ttl else 0.0,
        )
        self._index(record)
        self._save()
        return record

    def remove(self, name: str) -> KeyRecord | None:
        record = self.by_name.pop(name, None)
        if record is not None:
            del self.by_public[record.public_key]
            self.revoked[record.public_key] = record
            self._save()
        return record

    def records(self) -> list[KeyRecord]:
        return sorted(self.by_name.values(), key=lambda r: r.name)

    def _save(self) -> None:
        write_private(
            self.path, encode_json(IssuedKeys(keys=self.records(), revoked=[*self.revoked.values()]))
        )


# -- sockets ------------------------------------------------------------------------------------


def secure_server(sock: zmq.Socket, secret_key: str, socket_name: str, handshake_ms: int) -> None:
    """Make the endpoints `sock` binds from now on CURVE servers answering to `socket_name`'s domain."""
    sock.setsockopt(zmq.CURVE_SERVER, 1)
    sock.setsockopt(zmq.CURVE_SECRETKEY, secret_key.encode())
    sock.setsockopt(zmq.ZAP_DOMAIN, DOMAINS[socket_name][0])
    sock.setsockopt(zmq.HANDSHAKE_IVL, handshake_ms)


def secure_client(sock: zmq.Socket, keys: ClientKeyFile, handshake_ms: int) -> None:
    """CURVE for what `sock` connects to from now on, the broker checked against its public key."""
    sock.setsockopt(zmq.CURVE_SERVERKEY, keys.server_public_key.encode())
    sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.public_key.encode())
    sock.setsockopt(zmq.CURVE_SECRETKEY, keys.secret_key.encode())
    sock.setsockopt(zmq.HANDSHAKE_IVL, handshake_ms)


@dataclass(frozen=True, slots=True)
class ClientCurve:
    """A client's CURVE settings: its key file, and how long a handshake may take."""

    keys: ClientKeyFile
    handshake_ms: int

    def apply(self, sock: zmq.Socket) -> None:
        secure_client(sock, self.keys, self.handshake_ms)


def close_connection(fd: int, peername: tuple) -> bool:
    """End one TCP connection of a ZeroMQ socket: shut down the socket behind `fd` (libzmq then sees
    it close, and the peer sees EOF) when it is still the connection to `peername`; the descriptor
    may have gone to a newer connection since. False when it had."""
    try:
        dup = socket.socket(fileno=os.dup(fd))
    except OSError:
        return False
    try:
        if dup.getpeername() != peername:
            return False
        dup.shutdown(socket.SHUT_RDWR)
        return True
    except OSError:
        return False
    finally:
        dup.close()  # only the duplicate: libzmq closes its own descriptor


def peername_of(fd: int) -> tuple | None:
    try:
        dup = socket.socket(fileno=os.dup(fd))
    except OSError:
        return None
    try:
        return dup.getpeername()
    except OSError:
        return None
    finally:
        dup.close()


def frame_user(frame: zmq.Frame) -> str | None:
    """The ZAP User-Id of the connection a frame came on (a key's name), or None (no ZAP: ipc://)."""
    try:
        return frame.get("User-Id") or None
    except zmq.ZMQError:
        return None


class ZapHandler:
    """The ZAP socket, answered from the broker's loop: `serve()` when it is readable."""

    def __init__(self, context: zmq.Context, keys: KeyRegistry):
        self.keys = keys
        self.socket = context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        try:
            self.socket.bind(ZAP_ENDPOINT)
        except zmq.ZMQError as exc:
            self.socket.close()
            raise SystemExit(f"cannot answer ZAP ({ZAP_ENDPOINT}): {exc}") from None

    def serve(self, wall: float) -> list[tuple[Refusal, str, str, str]]:
        """Answer the waiting requests; returns each refusal with (socket name, address, key name)."""
        refused = []
        for _ in range(ZAP_BATCH):
            try:
                frames = self.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            answer, refusal = self._answer(frames, wall)
            if answer is not None:
                self.socket.send_multipart(answer)
            if refusal is not None:
                refused.append(refusal)
        return refused

    def _answer(self, frames: list[bytes], wall: float):
        # [routing id, "", version, request id, domain, address, identity, mechanism, credentials...]
        if len(frames) < 8 or frames[1] != b"" or frames[2] != ZAP_VERSION:
            return None, None  # not from libzmq: nothing to answer
        route, request_id, domain, address, mechanism = frames[0], frames[3], frames[4], frames[5], frames[7]
        socket_name = _SOCKET_OF_DOMAIN.get(domain, domain.decode(errors="replace"))
        name = ""
        if socket_name not in DOMAINS:
            refusal = Refusal(HANDSHAKE, f"a handshake in an unknown ZAP domain {socket_name!r}")
        elif mechanism != b"CURVE" or len(frames) != 9 or len(frames[8]) != 32:
            refusal = Refusal(
                MECHANISM, f"a {mechanism.decode(errors='replace')} handshake on tcp:// (only CURVE)"
            )
        else:
            record, refusal = self.keys.judge(z85.encode(frames[8]).decode(), socket_name, wall)
            name = record.name if record is not None else ""
        if refusal is None:
            return [route, b"", ZAP_VERSION, request_id, b"200", b"OK", name.encode(), b""], None
        answer = [route, b"", ZAP_VERSION, request_id, b"400", refusal.message.encode()[:255], b"", b""]
        return answer, (refusal, socket_name, address.decode(errors="replace"), name)


# -- the broker's side, together ----------------------------------------------------------------


@dataclass(slots=True)
class KeyedPeer:
    """A peer that authenticated with a key: which one, and its connection (to close it)."""

    name: str
    fd: int
    peername: tuple | None


class CurveServer:
    """What the broker needs for its tcp:// endpoints: its key pair, the issued keys, ZAP, and the
    peers connected with a key (PeerKey -> KeyedPeer), so that revoking or expiring a key ends them."""

    def __init__(self, context: zmq.Context, key_dir: Path, handshake_timeout: float):
        self.server = load_or_create_server_key(key_dir)
        self.keys = KeyRegistry(key_dir)
        self.handshake_ms = max(1, round(handshake_timeout * 1000))
        self.zap = ZapHandler(context, self.keys)
        self.peers: dict[tuple, KeyedPeer] = {}

    def secure(self, sock: zmq.Socket, socket_name: str) -> None:
        secure_server(sock, self.server.secret_key, socket_name, self.handshake_ms)

    def admit(
        self, peer_key: tuple, name: str, fd: int, socket_name: str, wall: float
    ) -> KeyRecord | Refusal:
        """A new peer whose connection's ZAP User-Id is `name`: its record, or why it is refused now
        (revoked or expired since its handshake)."""
        record = self.keys.by_name.get(name)
        if record is None:
            return Refusal(REVOKED, f"key {name!r} was revoked")
        refusal = judge(record, socket_name, wall)
        if refusal is not None:
            return refusal
        self.peers[peer_key] = KeyedPeer(name, fd, peername_of(fd))
        return record

    def issue(self, request: BusAuthKeysIssue, wall: float) -> KeyRecord:
        return self.keys.issue(request, wall, self.server.public_key)

    def revoke(self, name: str) -> tuple[KeyRecord, list[tuple]]:
        """Forget the key; returns it and the peers that used it (their connections are closed)."""
        record = self.keys.remove(name)
        if record is None:
            raise BusError(ErrorCode.NOT_FOUND, f"no key named {name!r} (baaaht-ctl auth keys list)")
        return record, [key for key, _name in self.disconnect(lambda keyed: keyed.name == name)]

    def expire(self, wall: float) -> list[tuple[tuple, KeyRecord]]:
        """Disconnect the peers whose key has expired; returns them with their key."""
        expired = {r.name: r for r in self.keys.by_name.values() if r.expires_at and wall >= r.expires_at}
        if not expired:
            return []
        return [(key, expired[name]) for key, name in self.disconnect(lambda keyed: keyed.name in expired)]

    def disconnect(self, which: Callable[[KeyedPeer], bool]) -> list[tuple[tuple, str]]:
        """Close the connections of the keyed peers `which` picks; returns (peer key, key name) each."""
        found = []
        for key in [key for key, keyed in self.peers.items() if which(keyed)]:
            keyed = self.peers.pop(key)
            if keyed.peername is not None:
                close_connection(keyed.fd, keyed.peername)
            found.append((key, keyed.name))
        return found

    def forget(self, known) -> None:
        """Drop what is kept for peers no longer in `known` (the registry's peers)."""
        for key in [key for key in self.peers if key not in known]:
            del self.peers[key]
