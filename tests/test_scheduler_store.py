"""The scheduler's SQLite adapter: pruning of finished tasks, and the move from schema version 1."""

from __future__ import annotations

import sqlite3

from baaaht.schemas.tasks import TaskInfo, TaskState
from baaaht.services.scheduler import store as store_module
from baaaht.services.scheduler.store import SchedulerStore


def task(task_id: str, state: TaskState, finished_at: float = 0.0) -> TaskInfo:
    return TaskInfo(
        id=task_id,
        queue="q",
        task_type="t",
        state=state,
        created_at=1.0,
        updated_at=1.0,
        finished_at=finished_at,
    )


def test_finished_tasks_older_than_the_cut_are_dropped_and_nothing_else(tmp_path):
    store = SchedulerStore(str(tmp_path / "tasks.db"))
    with store.batch() as batch:
        batch.put_task(task("old-done", TaskState.SUCCEEDED, finished_at=100.0))
        batch.put_task(task("old-dead", TaskState.DEAD, finished_at=150.0))
        batch.put_task(task("recent", TaskState.FAILED, finished_at=300.0))
        batch.put_task(task("queued", TaskState.QUEUED))
        batch.put_task(task("running", TaskState.RUNNING))
    with store.batch() as batch:
        batch.drop_finished_before(200.0)
    assert store.get("old-done") is None and store.get("old-dead") is None
    assert [t.id for t in store.list([], "", "", 100, 0)[0]] == ["recent", "queued", "running"]
    store.close()


def test_a_version_1_store_gets_its_finished_times_from_the_tasks(tmp_path, monkeypatch):
    path = str(tmp_path / "tasks.db")
    monkeypatch.setattr(store_module, "SCHEMA_VERSION", 1)
    old_schema = store_module._SCHEMA.replace("    finished_at REAL NOT NULL DEFAULT 0\n", "")
    old_schema = old_schema.replace("body BLOB NOT NULL,\n", "body BLOB NOT NULL\n", 1)
    old_schema = old_schema.replace(
        "CREATE INDEX tasks_by_finish ON tasks (finished_at) WHERE finished_at > 0;\n", ""
    )
    monkeypatch.setattr(store_module, "_SCHEMA", old_schema.replace("user_version = 2", "user_version = 1"))
    old = SchedulerStore(path)
    with old._db:
        for info in (task("done", TaskState.SUCCEEDED, finished_at=100.0), task("waiting", TaskState.QUEUED)):
            old._db.execute(
                "INSERT INTO tasks (id, queue, state, session_id, body) VALUES (?, 'q', ?, '', ?)",
                (info.id, info.state.value, store_module._encode(info)),
            )
    old.close()
    monkeypatch.undo()
    store = SchedulerStore(path)
    assert store._db.execute("PRAGMA user_version").fetchone()[0] == 2
    with store.batch() as batch:
        batch.drop_finished_before(200.0)
    assert store.get("done") is None and store.get("waiting") is not None
    store.close()
    columns = [row[1] for row in sqlite3.connect(path).execute("PRAGMA table_info(tasks)")]
    assert "finished_at" in columns
