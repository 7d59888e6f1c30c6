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


def test_a_stream_left_between_two_items_is_closed_by_close():
    # A caller that stops iterating after the line it wanted and closes the stream: no read is under
    # way, so nothing would ever see the socket's end; close() must close the response itself.
    response = FakeResponse()
    stream = EngineStream(response, iter(["one", "two"]), "logs c1")
    lines = iter(stream)
    assert next(lines) == "one"
    stream.close()
    assert response.closed
    assert list(lines) == []


def test_a_close_during_a_read_leaves_the_response_to_the_reader():
    response = FakeResponse()
    seen_closed_during_read = []

    def items():
        stream.close()  # from another thread, while this read blocks
        seen_closed_during_read.append(response.closed)
        yield "line"

    stream = EngineStream(response, items(), "logs c1")
    assert list(stream) == ["line"]  # what that read returned, and nothing more
    assert seen_closed_during_read == [False] and response.closed
