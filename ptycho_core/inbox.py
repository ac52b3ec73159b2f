"""A watched inbox: which datasets are complete, which were reconstructed, which failed.

State lives in ``<outbox>/.watch-state.json`` and is changed only under an exclusive file lock,
so several watchers can poll the same inbox. A dataset counts as complete when a marker file
(``<name><marker_suffix>``, e.g. ``scan1.h5.done``) exists, or when its size has not changed for
``stable_seconds``. Each dataset is keyed by its content hash: a second file with the same bytes
is recorded as a duplicate of the first and not reconstructed again.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .io.preprocess import content_digest
from .io.readers import EXTENSIONS


def candidates(inbox: str | Path) -> list[Path]:
    """Data files (and .zarr folders) in the inbox, by name."""
    inbox = Path(inbox)
    if not inbox.is_dir():
        return []
    return sorted(p for p in inbox.iterdir() if not p.name.startswith(".") and p.suffix.lower() in EXTENSIONS)


def size_of(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


@contextmanager
def locked_state(outbox: str | Path) -> Iterator[dict]:
    """The watch state, read and written back under an exclusive lock."""
    outbox = Path(outbox)
    outbox.mkdir(parents=True, exist_ok=True)
    path = outbox / ".watch-state.json"
    with open(outbox / ".watch-state.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        state = json.loads(path.read_text()) if path.is_file() else {"datasets": {}}
        yield state
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(state, indent=1, sort_keys=True))
        os.replace(tmp, path)


def is_complete(path: Path, entry: dict, stable_seconds: float, marker_suffix: str, now: float) -> bool:
    """True once the marker exists or the size held still for stable_seconds; updates entry."""
    if marker_suffix and path.with_name(path.name + marker_suffix).exists():
        return True
    size = size_of(path)
    if entry.get("size") != size:
        entry.update(size=size, size_since=now)
        return False
    return now - entry.get("size_since", now) >= stable_seconds


CLAIM_TIMEOUT_S = 6 * 3600  # a claim older than this belongs to a watcher that died


def claim_due_datasets(inbox: str | Path, outbox: str | Path, stable_seconds: float, marker_suffix: str,
                       max_attempts: int) -> list[dict]:
    """Complete datasets that still need a reconstruction (new, or failed fewer than max_attempts
    times), claimed for this watcher so another one polling at the same time skips them; returns
    their state entries (name, path, hash, attempts)."""
    now = time.time()
    due = []
    with locked_state(outbox) as state:
        for path in candidates(inbox):
            entry = state["datasets"].setdefault(path.name, {"status": "arriving", "attempts": 0})
            if entry["status"] in ("done", "failed", "submitted", "duplicate"):
                continue
            if entry["status"] == "claimed" and now - entry.get("claimed_at", 0) < CLAIM_TIMEOUT_S:
                continue
            if not is_complete(path, entry, stable_seconds, marker_suffix, now):
                continue
            if entry["attempts"] >= max_attempts:
                entry["status"] = "failed"
                continue
            digest = entry.get("hash") or content_digest(path)
            twin = next((name for name, other in state["datasets"].items() if name != path.name
                         and other.get("hash") == digest and other.get("status") in ("claimed", "submitted", "done")), None)
            if twin is not None:  # the same bytes under another name: one reconstruction serves both
                entry.update(path=str(path), hash=digest, status="duplicate", duplicate_of=twin)
                continue
            entry.update(path=str(path), hash=digest, status="claimed", claimed_at=now)
            due.append({"name": path.name, **entry})
    return due


def record(outbox: str | Path, name: str, **fields) -> None:
    with locked_state(outbox) as state:
        entry = state["datasets"].setdefault(name, {"attempts": 0})
        entry.update(fields)


def record_failure(outbox: str | Path, name: str, attempts_before: int, max_attempts: int, error: str,
                   **fields) -> int:
    """Count one more failed attempt: the dataset is retried in a later poll until max_attempts,
    then marked failed. Returns the attempts made."""
    attempts = attempts_before + 1
    record(outbox, name, attempts=attempts, error=error, status="failed" if attempts >= max_attempts else "retry",
           **fields)
    return attempts


def report(outbox: str | Path) -> list[dict]:
    with locked_state(outbox) as state:
        return [{"dataset": name, **entry} for name, entry in sorted(state["datasets"].items())]
