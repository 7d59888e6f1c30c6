"""A hostile agent for the fairness tests: floods the bus from one connection as fast as it can,
with requests to a service (TARGET, its body given as JSON), requests to the broker (`bus.ping`)
and events (small ones, and ones of EVENT_BYTES), never waiting for an answer before sending more.

    python tests/flooder.py ENDPOINT TARGET BODY_JSON EVENT_BYTES

It connects when it reads a line on stdin (so that a test can first issue its process an identity,
which the broker reads when the connection is made). Every half second it prints one JSON line: the
replies it has had so far, as "call CODE" or "event CODE" (OK for success), so a test can tell when
its limits have engaged. It stops when its stdin closes.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import msgspec
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from a checkout

from baaaht.bus import wire  # noqa: E402

REPORT_INTERVAL = 0.5


def main() -> None:
    endpoint, target, body_json, event_bytes = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    sys.stdin.readline()
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    dealer = zmq.Context.instance().socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(endpoint)
    call = msgspec.msgpack.encode(json.loads(body_json))
    small = wire.pack(wire.EVENT, b"agent.flood", msgspec.msgpack.encode({"n": 1}))
    big = wire.pack(wire.EVENT, b"agent.flood", msgspec.msgpack.encode("x" * (event_bytes - 16)))
    sends = [(target, call)] * 8 + [("bus.ping", b"\x80")] * 2
    replies: dict[str, int] = {}
    counter = 0
    next_report = time.monotonic()
    while not stop.is_set():
        try:
            for target, body in sends:
                counter += 1
                request = wire.request(format(counter, "x"), target, time.time() + 30, "", False, body)
                dealer.send(request, zmq.NOBLOCK)
            dealer.send(small, zmq.NOBLOCK)
            if counter % 100 == 0:
                dealer.send(big, zmq.NOBLOCK)
        except zmq.Again:
            pass  # its own queue to the broker is full: read what came back, then go on
        while dealer.poll(0):
            envelope = dealer.recv()
            if wire.kind_of(envelope) == wire.REPLY:
                header = wire.reply_header.decode(wire.header_of(envelope))
                answered = f"{'call' if header.id else 'event'} {header.error or 'OK'}"  # events have no id
                replies[answered] = replies.get(answered, 0) + 1
        if time.monotonic() >= next_report:
            print(json.dumps({"pid": os.getpid(), "replies": replies}), flush=True)
            next_report = time.monotonic() + REPORT_INTERVAL
    dealer.close(0)


if __name__ == "__main__":
    main()
