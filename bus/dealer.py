"""The connection's DEALER, with the monitor that says when it (dis)connects.

On ipc a dead broker's connection closes at once and the monitor reports it, so calls in
flight fail within milliseconds instead of after missed heartbeats; ZeroMQ keeps trying
to reconnect every RECONNECT_IVL (no long backoff), so a broker that comes back is
reached again within a fraction of a second.
"""

from __future__ import annotations

import itertools
import os
import sys

import zmq

from baaaht.bus.curve import ClientCurve

HANDSHAKE_FAILED = (
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)
# On CURVE, a connection is usable once its handshake has succeeded, not when TCP connects.
MONITORED = zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED | HANDSHAKE_FAILED
_monitor_names = itertools.count(1)


def new_dealer(
    context: zmq.Context, endpoint: str, curve: ClientCurve | None = None
) -> tuple[zmq.Socket, zmq.Socket]:
    """(DEALER connecting to `endpoint`, its monitor socket); close both with `close_dealer`."""
    dealer = context.socket(zmq.DEALER)
    if curve is not None:
        curve.apply(dealer)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.setsockopt(zmq.SNDHWM, 100_000)
    dealer.setsockopt(zmq.RCVHWM, 100_000)
    dealer.setsockopt(zmq.RECONNECT_IVL, 100)
    dealer.setsockopt(zmq.RECONNECT_IVL_MAX, 250)
    # A unique name: pyzmq's default is derived from the socket's fd, which a later socket reuses.
    monitor = dealer.get_monitor_socket(
        MONITORED, f"inproc://baaaht-monitor-{os.getpid()}-{next(_monitor_names)}"
    )
    dealer.connect(endpoint)
    return dealer, monitor


def monitor_event(frames: list[bytes]) -> tuple[int, int]:
    """(event number, value) of one monitor message: its first frame holds both (16 and 32 bits)."""
    head = frames[0]
    return int.from_bytes(head[:2], sys.byteorder), int.from_bytes(head[2:6], sys.byteorder)  # native order


def close_dealer(dealer: zmq.Socket, monitor: zmq.Socket, linger_ms: int = 0) -> None:
    dealer.disable_monitor()
    monitor.close(linger=0)
    dealer.close(linger=linger_ms)
