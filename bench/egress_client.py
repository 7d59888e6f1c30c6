"""The benchmark's HTTP client (standard library and baaaht's agent package), so the same code runs in an
agent container and on the host.

    python3 egress_client.py TARGET PREFIX CA_FILE REQUESTS STREAM_BYTES STREAMS

TARGET is `unix:/path/to/egress.sock` (through the proxy) or `https://127.0.0.1:PORT` (direct);
PREFIX the path before the upstream's (`/anthropic` through the proxy, "" direct). One kept-alive
connection; prints JSON: the time to first byte of each streamed Messages reply (seconds) and the
throughput of each large streamed body (bytes per second).
"""

from __future__ import annotations

import http.client
import json
import ssl
import sys
import time

from baaaht.agent.unix_http import UnixHTTPConnection

MESSAGE = json.dumps(
    {
        "model": "claude-fake",
        "max_tokens": 64,
        "stream": True,
        "messages": [{"role": "user", "content": "hi"}],
    }
).encode()
READ = 256 * 1024


def connection(target: str, ca_file: str) -> http.client.HTTPConnection:
    if target.startswith("unix:"):
        return UnixHTTPConnection(target[len("unix:") :])
    host, port = target.removeprefix("https://").rsplit(":", 1)
    return http.client.HTTPSConnection(host, int(port), context=ssl.create_default_context(cafile=ca_file))


def first_byte_times(conn: http.client.HTTPConnection, prefix: str, count: int) -> list[float]:
    times = []
    headers = {"Content-Type": "application/json", "anthropic-version": "2023-06-01"}
    for _ in range(count):
        started = time.perf_counter()
        conn.request("POST", f"{prefix}/v1/messages", body=MESSAGE, headers=headers)
        response = conn.getresponse()
        first = response.read1(READ)
        times.append(time.perf_counter() - started)
        assert response.status == 200 and first, (response.status, first)
        response.read()
    return times


def throughputs(conn: http.client.HTTPConnection, prefix: str, size: int, count: int) -> list[float]:
    rates = []
    for _ in range(count):
        started = time.perf_counter()
        conn.request("GET", f"{prefix}/bytes?size={size}&chunk=65536")
        response = conn.getresponse()
        received = 0
        while chunk := response.read1(READ):
            received += len(chunk)
        response.read()  # the end of the chunked body: the connection is ready for the next request
        assert response.status == 200 and received == size, (response.status, received)
        rates.append(size / (time.perf_counter() - started))
    return rates


def main() -> None:
    target, prefix, ca_file, requests, stream_bytes, streams = sys.argv[1:7]
    conn = connection(target, ca_file)
    first_byte_times(conn, prefix, 10)  # warm: the connection, the proxy's upstream pool, TLS
    result = {
        "ttfb": first_byte_times(conn, prefix, int(requests)),
        "throughput": throughputs(conn, prefix, int(stream_bytes), int(streams)),
    }
    conn.close()
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
