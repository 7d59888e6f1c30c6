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

import slow_disk  # bench/slow_disk.py, beside this script

RESULTS = Path(__file__).resolve().parent / "results"


def load_before(fsync_delay: bool = False) -> dict:
    """Call first thing, before the benchmark starts anything. `fsync_delay`: the benchmark runs under
    BENCH_FSYNC_DELAY_US (bench/slow_disk.py re-executes it with the shim); the others refuse it."""
    if fsync_delay:
        slow_disk.run_under_delay()
    elif slow_disk.delay_us():
        raise SystemExit(f"{slow_disk.SETTING}: only bench/sessions.py and bench/scheduler.py run under it")
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
    """bench/results/<name>.json (<name>-fsync-<delay>us.json under a delay): when, the fsync delay, the
    figures, and the load around the run (`finish`)."""
    RESULTS.mkdir(exist_ok=True)
    result = {
        "when": time.time(),
        "fsync_delay_us": slow_disk.delay_us(),
        **figures,
        "machine": finish(machine),
    }
    (RESULTS / f"{slow_disk.results_name(name)}.json").write_text(json.dumps(result, indent=2) + "\n")
