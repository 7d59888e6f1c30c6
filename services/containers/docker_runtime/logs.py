"""Container logs: Docker's multiplexed frames (or a TTY's raw stream) as lines, read or followed."""

from __future__ import annotations

import struct
from typing import Any, Callable, Iterator

from baaaht.schemas.containers import ContainerLogs, LogLine
from baaaht.services.containers.docker_runtime.connection import Connection
from baaaht.services.containers.docker_runtime.streams import EngineStream


class Logs:
    engine: Connection

    def logs(self, container: str, options: ContainerLogs) -> EngineStream[LogLine]:
        inspected = self.engine.call("logs", container, lambda api: api.inspect_container(container))
        tty = inspected["Config"].get("Tty")
        params: dict[str, Any] = {
            "stdout": int(options.stdout),
            "stderr": int(options.stderr),
            "timestamps": int(options.timestamps),
            "follow": int(options.follow),
            "tail": "all" if options.tail < 0 else str(options.tail),
        }
        if options.since:
            params["since"] = options.since
        if options.until:
            params["until"] = options.until

        def parse(api, response) -> Iterator[LogLine]:
            demuxer = LogDemuxer(options.timestamps)
            read = response.raw.read
            # A TTY container's log is one raw stream; otherwise frames say stdout or stderr.
            frames = (
                (("stdout", chunk) for chunk in iter(lambda: read(4096), b"")) if tty else demux_frames(read)
            )
            for stream, data in frames:
                yield from demuxer.feed(stream, data)
            yield from demuxer.flush()

        return self.engine.open_stream("logs", container, "get", "/containers/{0}/logs", params, parse)


class LogDemuxer:
    """Turns Docker's multiplexed log frames (8-byte header: stream, 0, 0, 0, big-endian length) into
    lines. A line may span frames; each stream keeps its own unfinished line until it is completed."""

    STREAMS = {1: "stdout", 2: "stderr"}

    def __init__(self, timestamps: bool):
        self.timestamps = timestamps
        self.partial: dict[str, bytes] = {"stdout": b"", "stderr": b""}

    def feed(self, stream: str, data: bytes) -> list[LogLine]:
        *complete, rest = (self.partial[stream] + data).split(b"\n")
        self.partial[stream] = rest
        return [self._line(stream, raw) for raw in complete]

    def flush(self) -> list[LogLine]:
        lines = [self._line(stream, rest) for stream, rest in self.partial.items() if rest]
        self.partial = {"stdout": b"", "stderr": b""}
        return lines

    def _line(self, stream: str, raw: bytes) -> LogLine:
        text = raw.decode("utf-8", errors="replace")
        if self.timestamps:
            stamp, _, text = text.partition(" ")
            return LogLine(stream=stream, text=text, time=stamp)
        return LogLine(stream=stream, text=text)


def read_exact(read: Callable[[int], bytes], size: int) -> bytes:
    """`size` bytes, or fewer only at the end of the stream (a raw socket read may return less)."""
    chunks, missing = [], size
    while missing:
        chunk = read(missing)
        if not chunk:
            break
        chunks.append(chunk)
        missing -= len(chunk)
    return b"".join(chunks)


def demux_frames(read: Callable[[int], bytes]) -> Iterator[tuple[str, bytes]]:
    while True:
        header = read_exact(read, 8)
        if len(header) < 8:
            return
        stream_id, length = struct.unpack(">BxxxL", header)
        data = read_exact(read, length)
        yield LogDemuxer.STREAMS.get(stream_id, "stdout"), data
        if len(data) < length:
            return
