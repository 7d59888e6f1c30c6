"""Every message type on the bus, one module per domain."""

import importlib

DOMAINS = ("bus", "config", "containers", "credentials", "egress", "policy", "sessions", "tasks")


def load_all() -> None:
    """Import every domain module, so that all schema types are known by tag."""
    for domain in DOMAINS:
        importlib.import_module(f"{__name__}.{domain}")
