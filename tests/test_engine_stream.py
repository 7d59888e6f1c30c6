"""EngineStream alone: who closes the response when close() and the first read race."""

from __future__ import annotations

from baaaht.services.containers.docker_runtime.streams import EngineStream


class FakeResponse:
    """No socket under it: shutdown_socket finds nothing to shut down."""

    def __init__(self):
        self.closed = False

    def close(self) -> None:
        self.closed = True


def test_a_stream_closed_before_its_first_read_reads_nothing():
    # The reader may start iterating only after another thread closed the stream (and its response):
    # it must then end at once, never read a response that is being closed under it.
    reads = []

    def items():
        reads.append("read")
        yield "line"

    response = FakeResponse()
    stream = EngineStream(response, items(), "logs c1")
    stream.close()
    assert response.closed
    assert list(stream) == [] and reads == []
