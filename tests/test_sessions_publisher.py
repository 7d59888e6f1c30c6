"""Events leave in the order they were queued, from one thread, even when queued from many."""

import threading

from baaaht.schemas.sessions import SessionIdle
from baaaht.services.sessions.publisher import OrderedPublisher


def test_events_are_published_in_queue_order_from_one_thread():
    published: list[tuple[int, str, str]] = []
    lock = threading.Lock()
    queued: list[int] = []

    def publish(event, subtopic):
        published.append((int(event.last_activity_at), subtopic, threading.current_thread().name))

    publisher = OrderedPublisher(publish)

    def queue_some(writer: int) -> None:
        for _ in range(50):
            with lock:  # like the store's lock: the queue order is the commit order
                number = len(queued)
                queued.append(number)
                publisher.publish(
                    SessionIdle(session_id="s", owner="o", last_activity_at=number), f"w{writer}"
                )

    threads = [threading.Thread(target=queue_some, args=(w,)) for w in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert publisher.flush(5)
    assert [number for number, _, _ in published] == list(range(400))
    assert {name for _, _, name in published} == {"session-events"}
    publisher.close(5)


def test_a_failing_publish_does_not_stop_the_rest():
    published = []

    def publish(event, subtopic):
        if event.session_id == "bad":
            raise RuntimeError("bus closed")
        published.append(event.session_id)

    publisher = OrderedPublisher(publish)
    for session_id in ("a", "bad", "b"):
        publisher.publish(SessionIdle(session_id=session_id, owner="o", last_activity_at=0))
    publisher.close(5)
    assert published == ["a", "b"]
