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

MONITORED = zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED
_monitor_names = itertools.count(1)


def new_dealer(context: zmq.Context, endpoint: str) -> tuple[zmq.Socket, zmq.Socket]:
    """(DEALER connecting to `endpoint`, its monitor socket); close both with `close_dealer`."""
    dealer = context.socket(zmq.DEALER)
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


def monitor_event(frames: list[bytes]) -> int:
    """The event number of one monitor message (its first frame starts with it, 16 bits)."""
    return int.from_bytes(frames[0][:2], sys.byteorder)  # libzmq writes it in native byte order


def close_dealer(dealer: zmq.Socket, monitor: zmq.Socket, linger_ms: int = 0) -> None:
    dealer.disable_monitor()
    monitor.close(linger=0)
    dealer.close(linger=linger_ms)
