"""http.client over a unix socket: how an agent speaks HTTP to the egress proxy (it has no network)."""

from __future__ import annotations

import http.client
import socket


class UnixHTTPConnection(http.client.HTTPConnection):
    """`Host: host`, request targets as through any proxy URL, the bytes through `socket_path`."""

    def __init__(self, socket_path: str, host: str = "egress", timeout: float | None = None) -> None:
        super().__init__(host, timeout=timeout)  # None: no timeout
        self.socket_path = socket_path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.socket_path)
