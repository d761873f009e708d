"""The agent's own memory, in SQLite under the state directory: desired state, revisions, events.

What runs is not stored here: the runtime (Docker's labels) is the source of truth for that.
What is stored is what the runtime cannot know: the desired state (each service's spec, secrets
included, hence mode 0600, its revision and how many instances of it are wanted; every other
revision is wanted at 0), what decided that count (manual scale, cron job, autoscaler), each
service's past revisions (for rollbacks), per-instance restart counts, last exits and GPU
assignments, and the event log. An agent restarted mid-rollout or mid-scale reads the desired
state back and carries on towards it.

Losing this file must never read as "the operator wants nothing": a database that is
unreadable or corrupt, or missing while instances of this agent run, stops the agent at
start with an error saying what to do (`StateError`); `--recover-from-runtime` rebuilds the
services from the instances' labels instead (`recover_from_runtime`).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from agent.runtime import LABEL_SPEC, Handle

RECOVER_HINT = ("start the agent with --recover-from-runtime to rebuild the services from the running instances' "
                "labels (their secrets are not in the labels: update those services with their full config after)")

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
CREATE TABLE IF NOT EXISTS groups (name TEXT PRIMARY KEY, spec TEXT NOT NULL, updated REAL NOT NULL);
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


def disk_full(exc: BaseException) -> bool:
    """Whether `exc` says a disk is full (a write's ENOSPC, or SQLite's SQLITE_FULL)."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    return isinstance(exc, sqlite3.OperationalError) and "disk is full" in str(exc)


def disk_full_message(state_dir: Path) -> str:
    try:
        free = f"{shutil.disk_usage(state_dir).free} bytes free"
    except OSError:
        free = "free space unknown"
    return f"the state directory's disk is full: {free} on {state_dir}; free space there and try again"


class StateError(Exception):
    """The state database cannot be trusted; the message says what to do. Nothing was touched."""


class Store:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        try:
            with open(path, "rb"):
                pass
            self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            verdict = self._db.execute("PRAGMA quick_check").fetchone()[0]
            if verdict != "ok":
                raise sqlite3.DatabaseError(verdict)
            self._db.executescript(SCHEMA)
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(services)")}
            for column, declaration in (("desired", "INTEGER"), ("scaling", "TEXT NOT NULL DEFAULT '{}'")):
                if column not in columns:  # a state directory written by an agent before desired counts
                    self._db.execute(f"ALTER TABLE services ADD COLUMN {column} {declaration}")
        except OSError as exc:
            raise StateError(f"cannot read the state database {path}: {exc.strerror or exc}; fix its permissions "
                             f"(the agent's user must read and write it), or move it aside and {RECOVER_HINT}") from None
        except sqlite3.DatabaseError as exc:
            raise StateError(f"the state database {path} is unreadable or corrupt ({exc}): move it aside and "
                             f"{RECOVER_HINT}") from None
        self._lock = threading.Lock()
        self._identity = _identity(path)

    def write_back_if_deleted(self) -> bool:
        """The file was deleted under the running agent (SQLite goes on with the unlinked file,
        and the next start would find nothing): write the open database back to its path and
        use that. True when it did."""
        if _identity(self.path) is not None:
            return False  # there (a file put in its place is the operator's: left alone)
        copy = self.path.with_name(self.path.name + ".restoring")
        with self._lock:
            copy.unlink(missing_ok=True)
            self._db.execute("VACUUM INTO ?", (str(copy),))
            os.chmod(copy, 0o600)
            os.replace(copy, self.path)
            self._db.close()
            self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
        self._identity = _identity(self.path)
        return True

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

    # --- service groups (their files, token included) -----------------------------------------

    def put_group(self, name: str, spec: dict[str, Any]) -> None:
        self._run("INSERT OR REPLACE INTO groups (name, spec, updated) VALUES (?, ?, ?)", (name, json.dumps(spec), time.time()))

    def groups(self) -> list[dict[str, Any]]:
        return [json.loads(spec) for (spec,) in self._run("SELECT spec FROM groups ORDER BY name")]

    def delete_group(self, name: str) -> bool:
        found = bool(self._run("SELECT 1 FROM groups WHERE name=?", (name,)))
        self._run("DELETE FROM groups WHERE name=?", (name,))
        return found

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


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_dev, stat.st_ino


def recover_from_runtime(store: Store, handles: Iterable[Handle]) -> list[str]:
    """Rebuild each service the store lacks from its newest instance's labels, under that
    instance's own revision (so every running instance is adopted as it runs, none restarted).
    The names recovered; services the store still holds keep their full (secret-bearing) spec."""
    known = {stored.name for stored in store.services()}
    newest: dict[str, Handle] = {}
    for handle in sorted(handles, key=lambda h: h.created_at):
        if handle.service not in known:
            newest[handle.service] = handle
    unlabelled = sorted(name for name, handle in newest.items() if LABEL_SPEC not in handle.labels)
    if unlabelled:
        raise StateError(f"cannot recover {', '.join(unlabelled)}: their instances carry no {LABEL_SPEC} label "
                         f"(started by an older berth); restore the state database from a backup")
    for name, handle in sorted(newest.items()):
        store.put_service(name, json.loads(handle.labels[LABEL_SPEC]), handle.revision)
        store.add_event("Recovered", f"rebuilt from instance {handle.id} (revision {handle.revision}); secrets "
                                     f"are not recovered", name)
    return sorted(newest)


def check_database(path: Path, handles: list[Handle]) -> None:
    """A missing database is a first start only when no instance of this agent runs."""
    if path.exists() or not handles:
        return
    names = ", ".join(sorted({handle.service for handle in handles}))
    raise StateError(f"the state database {path} is missing, but {len(handles)} instance(s) of this agent exist "
                     f"(services {names}); nothing was stopped. Restore the file, or {RECOVER_HINT}")
