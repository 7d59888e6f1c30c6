"""The supported test kit of baaaht services, for this repository's tests and for authors of
services outside it.

- `FakeBus`: records calls (`calls`, `requests()`) and events (`published`, `events()`), answers
  calls from a script; `FakeStream`: a stream the test feeds, bounded.
- `ServiceHarness`: a Service class built with its publisher and peers replaced by a FakeBus, its
  RPCs, event handlers and life cycle driven as the runner does (`serving` for a service built
  by hand).
- `Host` (and the `host`, `make_host` fixtures in `baaaht.bus.testing.fixtures`): a real broker
  and service processes on a private run directory (`short_run_dir` makes such a directory).
- Bounded waits: `Recorded.wait_until`, `FakeBus.wait_for_events`, `next_event` on a real
  subscription, `run_async` for a coroutine, and `wait_for` (a poll) for what nothing announces.
- `code_of`, `error_of`, `context` (for a stamped caller: `agent_caller`, `operator_caller`,
  `service_caller`).
"""

from baaaht.bus.testing.fakes import (
    Call,
    FakeBus,
    FakeStream,
    Published,
    agent_caller,
    code_of,
    context,
    error_of,
    operator_caller,
    round_trip,
    service_caller,
)
from baaaht.bus.testing.host import Host, short_run_dir
from baaaht.bus.testing.services import ServiceHarness, serving
from baaaht.bus.testing.waits import Recorded, next_event, run_async, wait_for

__all__ = [
    "Call",
    "FakeBus",
    "FakeStream",
    "Host",
    "Published",
    "Recorded",
    "ServiceHarness",
    "agent_caller",
    "code_of",
    "context",
    "error_of",
    "next_event",
    "operator_caller",
    "round_trip",
    "run_async",
    "service_caller",
    "serving",
    "short_run_dir",
    "wait_for",
]
