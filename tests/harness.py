"""The test kit's host and poll (baaaht.bus.testing) under the name tests written before it import;
new tests import baaaht.bus.testing."""

from baaaht.bus.testing import Host, wait_for

__all__ = ["Host", "wait_for"]
