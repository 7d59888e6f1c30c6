"""Frame layout of the baaaht bus protocol (docs/PROTOCOL.md is the contract).

Every message starts with one frame naming the protocol and the kind (`BHT1`
plus one byte), so a frame count stays small: in pyzmq each frame costs a call.
The ROUTER prepends the peer's routing id on the broker side. Headers are small msgpack arrays; bodies
are opaque bytes the broker never decodes (except for its own `bus.*` methods).
"""

from __future__ import annotations

import msgspec

from baaaht.bus.errors import BusError
from baaaht.schemas.bus import Caller, HealthReport, Register
from baaaht.schemas.errors import ErrorBody

PROTOCOL = b"BHT1"

# Frames after the kind frame, for each direction:
REQUEST = PROTOCOL + b"\x01"  # peer->broker: header, body | broker->service: header, body, route (token + caller)
REPLY = PROTOCOL + b"\x02"  # service->broker: reply header, body, token | broker->peer: reply header, body (final)
PARTIAL = PROTOCOL + b"\x03"  # like REPLY, but more replies follow (streaming)
CANCEL = PROTOCOL + b"\x04"  # peer->broker: request id | broker->service: token
REGISTER = PROTOCOL + b"\x05"  # service->broker: Register body
HEARTBEAT = PROTOCOL + b"\x06"  # peer->broker: [HealthReport body from a registered service] | broker->peer: nothing
DISCONNECT = PROTOCOL + b"\x07"  # broker->peer: ErrorBody (registration refused or unknown: register again)
EVENT = PROTOCOL + b"\x08"  # peer->broker: topic, body | PUB: [topic, EVENT, stamp, body]

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
TOKEN_SIZE = 8  # the broker's id for a request in flight: the first bytes of the route frame


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
    return [REQUEST, header, body]


def reply_frames(kind: bytes, request_id: str, body: bytes, token: bytes, error: str = "") -> list[bytes]:
    return [kind, encode(ReplyHeader(request_id, error)), body, token]


def raise_for_error(header: ReplyHeader, body: bytes) -> None:
    """Turn an error reply into the BusError it carries."""
    if header.error:
        raise BusError.from_body(error_body.decode(body))
