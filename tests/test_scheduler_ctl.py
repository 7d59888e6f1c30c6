"""`baaaht-ctl tasks|schedules|workers` against the real scheduler and a test worker."""

from __future__ import annotations

import functools

import orjson
import pytest

from tests import ctl_runner
from tests.scheduler_doubles import start_scheduler


@pytest.fixture
def scheduler(make_host):
    return start_scheduler(make_host)


@pytest.fixture
def run(scheduler):
    return functools.partial(ctl_runner.invoke, scheduler.host)


def test_submit_wait_get_list_and_workers(scheduler, run):
    scheduler.start_worker("ctl", slots=2, worker_id="ctl-worker")
    done = orjson.loads(run("tasks", "submit", "ctl", "echo", '{"a": [1, 2]}', "--wait", json=True).stdout)
    assert (done["state"], done["result"], done["payload"]) == ("succeeded", {"a": [1, 2]}, {"a": [1, 2]})
    shown = run("tasks", "get", done["id"]).stdout
    assert "succeeded" in shown
    listed = run("tasks", "list", "--queue", "ctl").stdout
    assert listed.splitlines()[0].split()[:4] == ["ID", "QUEUE", "TYPE", "STATE"] and done["id"] in listed
    workers = orjson.loads(run("workers", "list", json=True).stdout)
    assert [(w["worker_id"], w["slots"], w["connected"]) for w in workers] == [("ctl-worker", 2, True)]
    failed = run("tasks", "submit", "ctl", "fatal", "--wait", expect=1)
    assert "failed" in failed.stdout


def test_dead_requeue_cancel_and_bad_input(scheduler, run):
    queued = orjson.loads(
        run("tasks", "submit", "idle", "noop", "--delay", "1h", "--key", "k1", json=True).stdout
    )
    assert queued["state"] == "queued" and queued["not_before"]
    again = run("tasks", "submit", "idle", "noop", "--key", "k1", json=True)
    assert orjson.loads(again.stdout)["id"] == queued["id"] and "was seen" in again.stderr
    assert "cancelled" in run("tasks", "cancel", queued["id"]).stdout
    requeued = orjson.loads(run("tasks", "requeue", queued["id"], json=True).stdout)
    assert requeued["state"] == "queued"
    assert run("tasks", "dead").stdout.strip() == "(none)"
    bad = run("tasks", "submit", "q", "noop", "{not json", expect=1)
    assert "is not valid JSON" in bad.stderr
    missing = run("tasks", "get", "nope", expect=1)
    assert "NOT_FOUND" in missing.stderr
    assert (
        "expected skip"
        in run("schedules", "add", "q", "noop", "--every", "1s", "--overlap", "x", expect=1).stderr
    )


def test_schedules_add_list_pause_resume_rm(scheduler, run):
    added = orjson.loads(run("schedules", "add", "s", "noop", "--cron", "*/5 * * * *", json=True).stdout)
    assert added["cron"] == "*/5 * * * *" and added["next_run_at"]
    assert added["id"] in run("schedules", "list").stdout
    assert orjson.loads(run("schedules", "pause", added["id"], json=True).stdout)["paused"] is True
    assert (
        orjson.loads(run("schedules", "resume", added["id"], json=True).stdout).get("paused", False) is False
    )
    bad = run("schedules", "add", "s", "noop", "--cron", "99 * * * *", expect=1)
    assert "invalid cron expression" in bad.stderr
    run("schedules", "rm", added["id"])
    assert run("schedules", "list").stdout.strip() == "(none)"


def test_watch_follows_a_task_until_it_finishes(scheduler, run):
    scheduler.start_worker("w")
    task = scheduler.submit("w", "noop", delay=1.0)
    shown = run("tasks", "watch", task.id).stdout
    assert f"task.started {task.id} w/noop attempt 1" in shown
    assert f"task.succeeded {task.id}" in shown
    finished = run("tasks", "watch", task.id, expect=1)
    assert "has finished" in finished.stderr
