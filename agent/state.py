"""The agent's own memory, in SQLite under the state directory: desired state, revisions, events.

What runs is not stored here: the runtime (Docker's labels) is the source of truth for that.
What is stored is what the runtime cannot know: the desired state (each service's spec, secrets
included, hence mode 0600, its revision and how many instances of it are wanted; every other
revision is wanted at 0), what decided that count (manual scale, cron job, autoscaler), each
service's past revisions (for rollbacks), per-instance restart counts, last exits and GPU
assignments, and the event log. An agent restarted mid-rollout or mid-scale reads the desired
state back and carries on towards it.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS services (
    name TEXT PRIMARY KEY, spec TEXT NOT NULL, revision TEXT NOT NULL,
    deleting INTEGER NOT NULL DEFAULT 0, created REAL NOT NULL, updated REAL NOT NULL,
    desired INTEGER, scaling TEXT NOT NULL DEFAULT '{}');
CREATE TABLE IF NOT EXISTS revisions (
    service TEXT NOT NULL, revision TEXT NOT NULL, spec TEXT NOT NULL, created REAL NOT NULL,
    PRIMARY KEY (service, revision));
CREATE TABLE IF NOT EXISTS instances (
    service TEXT NOT NULL, slot INTEGER NOT NULL, restarts INTEGER NOT NULL DEFAULT 0,
    last_exit TEXT, gpus TEXT NOT NULL DEFAULT '[]', PRIMARY KEY (service, slot));
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, service TEXT, instance TEXT,
    kind TEXT NOT NULL, message TEXT NOT NULL);
"""


@dataclass
class StoredService:
    name: str
    spec: dict[str, Any]  # secrets revealed: never return this to a client as it is
    revision: str
    deleting: bool
    created: float
    desired: int | None  # instances of `revision` wanted; None: the spec's metadata.instance
    scaling: dict[str, Any]  # agent/scaling.py's record: manual count, cron job, autoscaler's last decision


@dataclass
class StoredInstance:
    restarts: int
    last_exit: dict | None
    gpus: list[str]


class Store:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(services)")}
        for column, declaration in (("desired", "INTEGER"), ("scaling", "TEXT NOT NULL DEFAULT '{}'")):
            if column not in columns:  # a state directory written by an agent before desired counts
                self._db.execute(f"ALTER TABLE services ADD COLUMN {column} {declaration}")
        self._lock = threading.Lock()

    def _run(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # --- services -----------------------------------------------------------------------------

    def put_service(self, name: str, spec: dict[str, Any], revision: str, desired: int | None = None) -> None:
        """The service's spec and revision; `desired` its count (None: the spec's metadata.instance, at start)."""
        now = time.time()
        text = json.dumps(spec)
        self._run(
            "INSERT INTO services (name, spec, revision, created, updated, desired) VALUES (?, ?, ?, ?, ?, ?) "
            "ON CONFLICT(name) DO UPDATE SET spec=excluded.spec, revision=excluded.revision, updated=excluded.updated, "
            "deleting=0, desired=excluded.desired",
            (name, text, revision, now, now, desired),
        )
        # `created` of a revision is when it was last deployed, so the newest other one is what a rollback returns to.
        self._run("INSERT INTO revisions VALUES (?, ?, ?, ?) ON CONFLICT(service, revision) DO UPDATE SET created=excluded.created",
                  (name, revision, text, now))

    def revision_spec(self, name: str, revision: str) -> dict[str, Any] | None:
        rows = self._run("SELECT spec FROM revisions WHERE service=? AND revision=?", (name, revision))
        return json.loads(rows[0][0]) if rows else None

    def previous_revision(self, name: str, current: str) -> tuple[str, dict[str, Any]] | None:
        """The revision deployed most recently before `current` (what `berth update --rollback` returns to)."""
        rows = self._run("SELECT revision, spec FROM revisions WHERE service=? AND revision!=? ORDER BY created DESC LIMIT 1",
                         (name, current))
        return (rows[0][0], json.loads(rows[0][1])) if rows else None

    def services(self) -> list[StoredService]:
        rows = self._run("SELECT name, spec, revision, deleting, created, desired, scaling FROM services ORDER BY name")
        return [StoredService(name, json.loads(spec), rev, bool(deleting), created, desired, json.loads(scaling))
                for name, spec, rev, deleting, created, desired, scaling in rows]

    def put_desired(self, name: str, desired: int, scaling: dict[str, Any]) -> None:
        """The instance count wanted of the current revision, and what decided it."""
        self._run("UPDATE services SET desired=?, scaling=? WHERE name=?", (desired, json.dumps(scaling), name))

    def mark_deleting(self, name: str) -> None:
        self._run("UPDATE services SET deleting=1 WHERE name=?", (name,))

    def delete_service(self, name: str) -> None:
        self._run("DELETE FROM services WHERE name=?", (name,))
        self._run("DELETE FROM instances WHERE service=?", (name,))
        self._run("DELETE FROM revisions WHERE service=?", (name,))

    # --- instances ----------------------------------------------------------------------------

    def instance(self, service: str, slot: int) -> StoredInstance:
        rows = self._run("SELECT restarts, last_exit, gpus FROM instances WHERE service=? AND slot=?", (service, slot))
        if not rows:
            return StoredInstance(0, None, [])
        restarts, last_exit, gpus = rows[0]
        return StoredInstance(restarts, json.loads(last_exit) if last_exit else None, json.loads(gpus))

    def put_instance(self, service: str, slot: int, record: StoredInstance) -> None:
        self._run(
            "INSERT OR REPLACE INTO instances VALUES (?, ?, ?, ?, ?)",
            (service, slot, record.restarts, json.dumps(record.last_exit) if record.last_exit else None, json.dumps(record.gpus)),
        )

    def drop_instance(self, service: str, slot: int) -> None:
        self._run("DELETE FROM instances WHERE service=? AND slot=?", (service, slot))

    # --- events -------------------------------------------------------------------------------

    def add_event(self, kind: str, message: str, service: str | None = None, instance: str | None = None) -> dict:
        at = time.time()
        with self._lock:
            cursor = self._db.execute(
                "INSERT INTO events (at, service, instance, kind, message) VALUES (?, ?, ?, ?, ?)",
                (at, service, instance, kind, message),
            )
            event_id = cursor.lastrowid
        return {"id": event_id, "at": at, "service": service, "instance": instance, "kind": kind, "message": message}

    def events(self, *, since: int = 0, service: str | None = None, limit: int = 1000) -> list[dict]:
        sql = "SELECT id, at, service, instance, kind, message FROM events WHERE id > ?"
        args: tuple = (since,)
        if service:
            sql += " AND service = ?"
            args += (service,)
        rows = self._run(sql + " ORDER BY id DESC LIMIT ?", args + (limit,))
        keys = ("id", "at", "service", "instance", "kind", "message")
        return [dict(zip(keys, row)) for row in reversed(rows)]

    def close(self) -> None:
        with self._lock:
            self._db.close()
