"""A hostile agent for the fairness tests: floods the bus from one connection as fast as it can,
with requests to a service (TARGET, its body given as JSON), requests to the broker (`bus.ping`)
and events (small ones, and ones of EVENT_BYTES), never waiting for an answer before sending more,
until it is killed. It runs in a container of the agent image (`python3 -c SOURCE ...`: it needs
nothing but what the image has), on the agents' bus the container manager hands it in BAAAHT_BUS.

    python3 flooder.py TARGET BODY_JSON EVENT_BYTES

Every half second it prints one JSON line: the replies it has had so far, as "call CODE" or
"event CODE" (OK for success), so a test can tell when its limits have engaged.
"""

from __future__ import annotations

import json
import os
import sys
import time

import msgspec
import zmq

from baaaht.bus import wire

REPORT_INTERVAL = 0.5


def main() -> None:
    target, body_json, event_bytes = sys.argv[1], sys.argv[2], int(sys.argv[3])
    endpoint = os.environ["BAAAHT_BUS"]
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
    while True:
        try:
            for method, body in sends:
                counter += 1
                request = wire.request(format(counter, "x"), method, time.time() + 30, "", False, body)
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


if __name__ == "__main__":
    main()
