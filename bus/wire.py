"""Frame layout of the baaaht bus protocol (docs/PROTOCOL.md is the contract).

Every message a peer sends is `[PROTOCOL, kind, ...]`; the ROUTER prepends the
peer's routing id on the broker side. Headers are small msgpack arrays; bodies
are opaque bytes the broker never decodes (except for its own `bus.*` methods).
"""

from __future__ import annotations

import msgspec

from baaaht.bus.errors import BusError
from baaaht.schemas.bus import Caller, HealthReport, Register
from baaaht.schemas.errors import ErrorBody

PROTOCOL = b"BHT1"

# One byte per kind. Frames after [PROTOCOL, kind] for each direction:
REQUEST = b"\x01"  # peer->broker: header, body | broker->service: header, body, token, caller
REPLY = b"\x02"  # service->broker: reply header, body, token | broker->peer: reply header, body (final)
PARTIAL = b"\x03"  # like REPLY, but more replies follow (streaming)
CANCEL = b"\x04"  # peer->broker: request id | broker->service: token
REGISTER = b"\x05"  # service->broker: Register body
HEARTBEAT = b"\x06"  # peer->broker: [HealthReport body from a registered service] | broker->peer: nothing
DISCONNECT = b"\x07"  # broker->peer: ErrorBody (registration refused or unknown: register again)
EVENT = b"\x08"  # peer->broker: topic, body | PUB: [topic, PROTOCOL, stamp, body]

KIND_NAMES = {
    REQUEST: "request",
    REPLY: "reply",
    PARTIAL: "partial",
    CANCEL: "cancel",
    REGISTER: "register",
    HEARTBEAT: "heartbeat",
    DISCONNECT: "disconnect",
    EVENT: "event",
}

FLAG_STREAM = 1


class RequestHeader(msgspec.Struct, array_like=True):
    id: str
    target: str
    deadline: float
    correlation: str = ""
    flags: int = 0


class ReplyHeader(msgspec.Struct, array_like=True):
    id: str
    error: str = ""  # an ErrorCode value when the body is an ErrorBody


class EventStamp(msgspec.Struct, array_like=True):
    seq: int
    time: float
    source: str


encode = msgspec.msgpack.Encoder().encode
request_header = msgspec.msgpack.Decoder(RequestHeader)
reply_header = msgspec.msgpack.Decoder(ReplyHeader)
event_stamp = msgspec.msgpack.Decoder(EventStamp)
error_body = msgspec.msgpack.Decoder(ErrorBody)
register_body = msgspec.msgpack.Decoder(Register)
health_body = msgspec.msgpack.Decoder(HealthReport)
caller_body = msgspec.msgpack.Decoder(Caller)


def request_frames(
    request_id: str, target: str, deadline: float, correlation: str, stream: bool, body: bytes
):
    header = encode(RequestHeader(request_id, target, deadline, correlation, FLAG_STREAM if stream else 0))
    return [PROTOCOL, REQUEST, header, body]


def reply_frames(kind: bytes, request_id: str, body: bytes, token: bytes, error: str = "") -> list[bytes]:
    return [PROTOCOL, kind, encode(ReplyHeader(request_id, error)), body, token]


def raise_for_error(header: ReplyHeader, body: bytes) -> None:
    """Turn an error reply into the BusError it carries."""
    if header.error:
        raise BusError.from_body(error_body.decode(body))
