"""Shared pure code every layer may import: units, the host config and its rules, logging set-up,
the bus endpoints' paths and the policy document model.

Layers point one way: `schemas` and `common` at the bottom (common imports only schemas and
itself), `bus` above them, `services` above the bus, `host` and `ctl` on top
(tests/test_layers.py enforces it).
"""
