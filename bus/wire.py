"""Frame layout of the baaaht bus protocol (docs/PROTOCOL.md is the contract).

A message is one envelope frame, plus a route frame where the broker needs one:

    envelope = b"BHT1" | kind (1 byte) | header length (2 bytes, big-endian) | header | body

In pyzmq every frame costs a Python call on each side, so the broker reads one
envelope, decodes only its small header, and forwards the same bytes on: the
body is never decoded or copied on the way through. The ROUTER adds the peer's
routing id in front on the broker side.
"""

from __future__ import annotations

import struct

import msgspec

from baaaht.bus.errors import BusError
from baaaht.schemas.bus import Caller, Register, ServiceHealth, StampedEvent
from baaaht.schemas.errors import ErrorBody

PROTOCOL = b"BHT1"
PREFIX = len(PROTOCOL) + 1 + 2  # protocol, kind, header length

# Kinds, with what header and body carry and the frames that follow the envelope.
REQUEST = PROTOCOL + b"\x01"  # RequestHeader, request body | broker->service: + route (token + Caller)
REPLY = PROTOCOL + b"\x02"  # ReplyHeader (with the broker's token from a service), result or ErrorBody
PARTIAL = PROTOCOL + b"\x03"  # like REPLY, but more replies follow (streaming)
CANCEL = PROTOCOL + b"\x04"  # body: the request id (peer->broker) or the token (broker->service)
REGISTER = PROTOCOL + b"\x05"  # body: Register
HEARTBEAT = PROTOCOL + b"\x06"  # body: ServiceHealth from a registered service, else empty
DISCONNECT = PROTOCOL + b"\x07"  # body: ErrorBody (broker->peer: refused, or unknown so register again)
EVENT = PROTOCOL + b"\x08"  # header: the topic (UTF-8); on PUB: [topic, envelope with an EventStamp header]
# publisher->broker: header empty; body: EVENT envelopes, each after its 4-byte length. On PUB (the
# broker's batch of consecutive events): [b"", envelope with an EventStamp header (seq: the last one's,
# prev: the one before the first) and a msgpack array of StampedEvent (as bus.events.replay's) as body].
EVENTS = PROTOCOL + b"\x09"
# agent->broker on the agent socket: body a msgpack array of topic prefixes (replacing any before; []
# stops). The broker then sends the agent [EVENT envelope with an EventStamp header, topic] for each
# event of its own session that its role may receive (bus/authorize.py may_receive).
SUBSCRIBE = PROTOCOL + b"\x0a"

KIND_NAMES = {
    REQUEST: "request",
    REPLY: "reply",
    PARTIAL: "partial",
    CANCEL: "cancel",
    REGISTER: "register",
    HEARTBEAT: "heartbeat",
    DISCONNECT: "disconnect",
    EVENT: "event",
    EVENTS: "events",
    SUBSCRIBE: "subscribe",
}

EVENTS_BATCH_BYTES = 32 * 1024  # a batch stays within the broker's per-frame slack whatever its limits
FLAG_STREAM = 1
TOKEN_SIZE = 8  # the broker's id for a request in flight: the first bytes of the route frame
MAX_HEADER = 0xFFFF


class MalformedFrame(ValueError):
    pass


class RequestHeader(msgspec.Struct, array_like=True):
    id: str
    target: str
    deadline: float
    correlation: str = ""
    flags: int = 0


class ReplyHeader(msgspec.Struct, array_like=True):
    id: str
    error: str = ""  # an ErrorCode value when the body is an ErrorBody
    token: bytes = b""  # service->broker: the route's token, so every message is one envelope


class EventStamp(msgspec.Struct, array_like=True):
    seq: int
    time: float
    source: str
    epoch: int = 0  # the broker's start time (ms): numbering starts again when it changes
    # The seq of the previous event sent on this stream: on PUB seq - 1 (every event is sent); on an
    # agent connection the previous one that matched its subscription, so a filtered stream shows a loss.
    prev: int = 0


encode = msgspec.msgpack.Encoder().encode
request_header = msgspec.msgpack.Decoder(RequestHeader)
reply_header = msgspec.msgpack.Decoder(ReplyHeader)
event_stamp = msgspec.msgpack.Decoder(EventStamp)
published_batch = msgspec.msgpack.Decoder(list[StampedEvent])
error_body = msgspec.msgpack.Decoder(ErrorBody)
register_body = msgspec.msgpack.Decoder(Register)
subscribe_body = msgspec.msgpack.Decoder(list[str])
health_body = msgspec.msgpack.Decoder(ServiceHealth)
caller_body = msgspec.msgpack.Decoder(Caller)


def pack(kind: bytes, header: bytes = b"", body: bytes = b"") -> bytes:
    if len(header) > MAX_HEADER:
        raise MalformedFrame(f"header of {len(header)} bytes is over {MAX_HEADER}")
    return b"".join((kind, len(header).to_bytes(2, "big"), header, body))


def kind_of(envelope: bytes) -> bytes:
    """The kind, or b"" when this is not a baaaht envelope."""
    kind = envelope[:5]
    return kind if kind in KIND_NAMES and len(envelope) >= PREFIX else b""


def header_of(envelope: bytes) -> bytes:
    size = envelope[5] << 8 | envelope[6]
    if PREFIX + size > len(envelope):
        raise MalformedFrame(f"header length {size} runs past the end of the frame")
    return envelope[PREFIX : PREFIX + size]


def split(envelope: bytes) -> tuple[bytes, bytes]:
    """(header, body) of an envelope."""
    header = header_of(envelope)
    return header, envelope[PREFIX + len(header) :]


def batch_of_events(envelopes: list[bytes]) -> bytes:
    """One EVENTS envelope carrying EVENT envelopes in order: one send and one receive for all."""
    parts = [EVENTS, b"\0\0"]
    for envelope in envelopes:
        parts += (len(envelope).to_bytes(4, "big"), envelope)
    return b"".join(parts)


def events_in(body: bytes) -> list[tuple[bytes, bytes]]:
    """(topic, body) of each EVENT in an EVENTS body, all checked before any is used: a batch
    with a length past its end, anything but EVENT envelopes in it, or over EVENTS_BATCH_BYTES
    (what one message may make the broker do) is refused whole."""
    if len(body) > EVENTS_BATCH_BYTES:
        raise MalformedFrame(f"a batch of {len(body)} bytes is over {EVENTS_BATCH_BYTES}")
    events, at, end = [], 0, len(body)
    append = events.append
    while at < end:
        try:
            size, kind, header_size = _item_head(body, at)  # one call for the fields of each item
        except struct.error:  # fewer bytes left than an item's length and envelope prefix
            size, kind, header_size = 0, b"", 0
        start = at + 4  # the envelope's
        stop = start + size
        topic_end = start + PREFIX + header_size
        if kind != EVENT or topic_end > stop or stop > end:
            raise MalformedFrame(f"item at byte {at} of the batch is not a whole EVENT envelope")
        append((body[start + PREFIX : topic_end], body[topic_end:stop]))
        at = stop
    return events


# An EVENTS item's length (4 bytes), then its envelope's kind (5) and header length (2), big-endian.
_item_head = struct.Struct(">I5sH").unpack_from


def request(
    request_id: str, target: str, deadline: float, correlation: str, stream: bool, body: bytes
) -> bytes:
    header = encode(RequestHeader(request_id, target, deadline, correlation, FLAG_STREAM if stream else 0))
    return pack(REQUEST, header, body)


def reply(kind: bytes, request_id: str, body: bytes, error: str = "", token: bytes = b"") -> bytes:
    return pack(kind, encode(ReplyHeader(request_id, error, token)), body)


def error_reply(request_id: str, error: BusError) -> bytes:
    return reply(REPLY, request_id, encode(error.body()), error.code.value)


def raise_for_error(header: ReplyHeader, body: bytes) -> None:
    """Turn an error reply into the BusError it carries."""
    if header.error:
        raise BusError.from_body(error_body.decode(body))
