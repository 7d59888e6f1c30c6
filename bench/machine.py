"""How busy the machine was, for every benchmark's results.

Only the load before a run says whether others were using the machine: during and after it the
benchmark's own processes keep 2 cores busy, so counting that load would call every run noisy.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def load_before() -> dict:
    """Call first thing, before the benchmark starts anything."""
    return {"cpus": os.cpu_count(), "load_before": os.getloadavg()}


def finish(machine: dict) -> dict:
    """The load figures to store with the results, and a warning on stderr when the run was noisy."""
    machine = {**machine, "load_after": os.getloadavg()}
    busy = machine["load_before"][0]
    if busy > (machine["cpus"] or 1) / 2:
        print(
            f"the machine was busy before the run (load {busy:.1f} on {machine['cpus']} cores): these "
            "figures are noisy; commit results only from a quiet run",
            file=sys.stderr,
        )
    return machine


def save(name: str, machine: dict, figures: dict) -> None:
    """bench/results/<name>.json: when, the figures, and the load around the run (`finish`)."""
    RESULTS.mkdir(exist_ok=True)
    result = {"when": time.time(), **figures, "machine": finish(machine)}
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
