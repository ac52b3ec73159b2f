"""A watched inbox: which datasets are complete, which were reconstructed, which failed.

State lives in ``<outbox>/.watch-state.json`` and is changed only under an exclusive file lock
(``.watch-state.lock``), so several watchers can poll the same inbox. The lock is held for
milliseconds: datasets are hashed outside it. A watcher that cannot have it within ``wait_s``
(another process stuck holding it) gives up with StateBusy instead of queueing behind it. The
file is replaced atomically and durably (checkpoint.atomic_write); a state file that cannot be
read (a power loss caught an older ptyflow's write, a disk fault) is set aside with a warning and
rebuilt from the outbox's run directories.

A dataset counts as complete when a marker file (``<name><marker_suffix>``, e.g.
``scan1.h5.done``) exists, or when its size has not changed for ``stable_seconds``. Each dataset
is keyed by its content hash: a second file with the same bytes is recorded as a duplicate of the
first and not reconstructed again.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from ptycho_core.checkpoint import atomic_write
from ptycho_core.io.preprocess import content_digest, recorded_inputs, stat_list
from ptycho_core.io.readers import EXTENSIONS, dataset_files, is_part_of_a_dataset

log = logging.getLogger("ptyflow")

STATE_FILE = ".watch-state.json"
LOCK_FILE = ".watch-state.lock"
LOCK_WAIT_S = 60.0  # the lock is held for milliseconds; a minute without it means a stuck holder
CLAIM_TIMEOUT_S = 6 * 3600  # a claim older than this belongs to a watcher that died


class StateBusy(RuntimeError):
    """The watch state's lock was not had within the wait: another process holds it."""


def candidates(inbox: str | Path) -> list[Path]:
    """Datasets in the inbox, by name: data files and .zarr folders, less the files that are read
    through another one (a Dectris master's data files: the master is the dataset)."""
    inbox = Path(inbox)
    if not inbox.is_dir():
        return []
    return sorted(p for p in inbox.iterdir() if not p.name.startswith(".") and p.suffix.lower() in EXTENSIONS
                  and not is_part_of_a_dataset(p))


def _stats(path: Path) -> list[list]:
    """[name, size, mtime_ns] of the dataset's files (a Dectris master's data files included); a
    file that went away between listing and stat is left out (the next poll sees the change)."""
    return stat_list(path, dataset_files(path), missing_ok=True)


def size_of(path: Path) -> int:
    """Bytes of a dataset's files: it is complete once this holds still."""
    return sum(size for _, size, _ in _stats(path))


def signature(path: Path) -> list[int]:
    """[bytes, newest modification time in ns] of a dataset's files: what hashing it must not see change."""
    stats = _stats(path)
    return [sum(size for _, size, _ in stats), max((mtime for _, _, mtime in stats), default=0)]


# --------------------------------------------------------------------------- the state file
@contextmanager
def _exclusive(outbox: Path, wait_s: Optional[float]) -> Iterator[None]:
    """Hold the state's lock, waiting at most ``wait_s`` (None: LOCK_WAIT_S) for it; StateBusy
    names the holder."""
    wait_s = LOCK_WAIT_S if wait_s is None else wait_s
    path = outbox / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = _read_json(path) or {}
                    who = (f"host {holder.get('host')} PID {holder.get('pid')} (since {holder.get('since')})"
                           if holder.get("pid") else "another process")
                    raise StateBusy(f"{path} is held by {who}; waited {wait_s:g} s for it") from None
                time.sleep(0.05)
        me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)  # who holds it, for the message above
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the flock


def _read_json(path: Path) -> Optional[dict]:
    """The JSON object in ``path``, or None when it is missing or is not one."""
    try:
        return _parse(path.read_bytes())
    except FileNotFoundError:
        return None


def _parse(raw: bytes) -> Optional[dict]:
    try:
        data = json.loads(raw)
    except ValueError:  # empty, cut short, not UTF-8
        return None
    return data if isinstance(data, dict) else None


def _dumps(state: dict) -> str:
    return json.dumps(state, indent=1, sort_keys=True)


@contextmanager
def locked_state(outbox: str | Path, wait_s: Optional[float] = None) -> Iterator[dict]:
    """The watch state, read and (when changed) written back under the lock.

    ``outbox_id`` names this outbox's state for as long as it lives: a deleted outbox made again
    at the same path gets a new one, so its datasets' child runs get new idempotency keys."""
    outbox = Path(outbox)
    outbox.mkdir(parents=True, exist_ok=True)
    path = outbox / STATE_FILE
    with _exclusive(outbox, wait_s):
        raw = path.read_bytes() if path.exists() else None
        state = _parse(raw) if raw is not None else {"datasets": {}}
        if state is None or not isinstance(state.get("datasets"), dict):
            state, raw = _set_aside_and_rebuild(outbox, path), None
        state.setdefault("outbox_id", uuid.uuid4().hex)
        yield state
        text = _dumps(state)
        if raw is None or text.encode() != raw:
            atomic_write(path, lambda tmp: tmp.write_text(text))


def _set_aside_and_rebuild(outbox: Path, path: Path) -> dict:
    aside = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%dT%H%M%S')}")
    os.replace(path, aside)
    state = rebuilt_state(outbox)
    log.warning("%s could not be read; set aside as %s and rebuilt from the run directories in %s: %d dataset(s) "
                "done", path, aside.name, outbox, len(state["datasets"]))
    return state


def rebuilt_state(outbox: Path) -> dict:
    """The state as the outbox's run directories tell it: a finished run (rundir.finished) is done
    for the dataset it reconstructed (its config.yaml's data.path), keyed by that file's sha256 as
    its preprocessing recorded it. Unfinished or unreadable run directories are left out: their
    datasets are claimed again, and the rerun continues from their checkpoints."""
    from ptycho_core.config import ConfigError
    from ptycho_core.rundir import RunDirError, RunPaths, finished, read_run_config

    datasets = {}
    for run_dir in sorted(p for p in outbox.iterdir() if p.is_dir() and (p / "config.yaml").is_file()):
        try:
            if not finished(run_dir):
                continue
            data_path = Path(read_run_config(run_dir).data.path)
        except (ConfigError, RunDirError, OSError) as exc:
            log.warning("rebuilding the watch state: %s left out (%s)", run_dir, exc)
            continue
        entry = {"status": "done", "attempts": 0, "path": str(data_path), "run_dir": str(run_dir), "rebuilt": True}
        recorded = next((r for r in recorded_inputs(RunPaths(run_dir).preprocessed)
                         if Path(r.get("path", "")) == data_path), {})
        if recorded.get("sha256"):
            entry["hash"] = recorded["sha256"]
        datasets[data_path.name] = entry
    return {"datasets": datasets}


# --------------------------------------------------------------------------- polling
def is_complete(path: Path, entry: dict, stable_seconds: float, marker_suffix: str, now: float) -> bool:
    """True once the marker exists or the size held still for stable_seconds; updates entry."""
    if marker_suffix and path.with_name(path.name + marker_suffix).exists():
        return True
    size = size_of(path)
    if entry.get("size") != size:
        entry.update(size=size, size_since=now)
        return False
    return now - entry.get("size_since", now) >= stable_seconds


def claim_due_datasets(inbox: str | Path, outbox: str | Path, stable_seconds: float, marker_suffix: str,
                       max_attempts: int, wait_s: Optional[float] = None, live: bool = False) -> list[dict]:
    """Complete datasets that still need a reconstruction (new, or failed fewer than max_attempts
    times), claimed for this watcher so another one polling at the same time skips them; returns
    their state entries (name, path, hash, attempts) with the state's outbox_id. ``live``: every
    dataset is due as soon as it appears (its run follows the file as it is written), and it is
    not hashed (its bytes are not final): no duplicate is recognised, and its hash stays None.

    Three steps, so that hashing a multi-GB file never holds the lock: claim under the lock, hash
    without it, then under the lock again keep each claim that is still this watcher's, whose file
    did not change while it was hashed, and whose bytes no other dataset holds yet (that one, maybe
    hashed by another watcher meanwhile, is its twin: it is recorded a duplicate)."""
    now = time.time()
    token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    claimed: dict[str, tuple[Path, Optional[str], list[int]]] = {}
    with locked_state(outbox, wait_s) as state:
        for path in candidates(inbox):
            entry = state["datasets"].setdefault(path.name, {"status": "arriving", "attempts": 0})
            if entry["status"] in ("done", "failed", "submitted", "duplicate"):
                continue
            if entry["status"] == "claimed" and now - entry.get("claimed_at", 0) < CLAIM_TIMEOUT_S:
                continue
            if not live and not is_complete(path, entry, stable_seconds, marker_suffix, now):
                continue
            if entry["attempts"] >= max_attempts:
                entry["status"] = "failed"
                continue
            claimed[path.name] = (path, entry.get("hash"), signature(path))
            entry.update(path=str(path), status="claimed", claimed_at=now, claim=token)
    try:
        digests = {name: None if live else known or content_digest(path) for name, (path, known, _) in claimed.items()}
        changed = set() if live else {name for name, (path, _, before) in claimed.items() if signature(path) != before}
    except BaseException:  # stopped while hashing: hand the claims back rather than leave them for hours
        try:
            with locked_state(outbox, wait_s) as state:
                for name in claimed:
                    if state["datasets"].get(name, {}).get("claim") == token:
                        _unclaim(state["datasets"][name])
        except StateBusy:
            pass  # they expire after CLAIM_TIMEOUT_S
        raise
    due = []
    with locked_state(outbox, wait_s) as state:
        for name, digest in digests.items():
            entry = state["datasets"].get(name, {})
            if entry.get("status") != "claimed" or entry.get("claim") != token:
                continue  # the claim expired and another watcher took it
            if name in changed:  # still being written after all: wait for it to hold still again
                _unclaim(entry)
                entry.pop("size", None)
                continue
            twin = None if digest is None else next(
                (other_name for other_name, other in state["datasets"].items() if other_name != name
                 and other.get("hash") == digest and other.get("status") in ("claimed", "submitted", "done")), None)
            if twin is not None:  # the same bytes under another name: one reconstruction serves both
                entry.pop("claim")
                entry.update(hash=digest, status="duplicate", duplicate_of=twin)
                continue
            entry["hash"] = digest
            due.append({"name": name, **entry, "outbox_id": state["outbox_id"]})
    return due


def hand_back(outbox: str | Path, entries: list[dict], wait_s: Optional[float] = None) -> None:
    """Give up this watcher's claims on ``entries`` (claim_due_datasets' results) when its poll is
    stopped: the next poll takes them again, their attempts unchanged. A claim another watcher has
    taken over meanwhile is left alone; a state whose lock is not had lets the claims expire."""
    try:
        with locked_state(outbox, wait_s) as state:
            for due in entries:
                entry = state["datasets"].get(due["name"], {})
                if entry.get("status") == "claimed" and entry.get("claim") == due.get("claim"):
                    _unclaim(entry)
    except StateBusy:
        pass  # they expire after CLAIM_TIMEOUT_S


def _unclaim(entry: dict) -> None:
    entry.pop("claim", None)
    entry["status"] = "retry" if entry.get("attempts") else "arriving"


def record(outbox: str | Path, name: str, wait_s: Optional[float] = None, **fields) -> None:
    with locked_state(outbox, wait_s) as state:
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


def report(outbox: str | Path, wait_s: Optional[float] = None) -> list[dict]:
    with locked_state(outbox, wait_s) as state:
        return _rows(state)


def peek(outbox: str | Path) -> list[dict]:
    """report() without the lock, for when it is not had: the file is replaced whole, so what is
    read is some poll's complete state ([] when there is none or it cannot be read)."""
    return _rows(_read_json(Path(outbox) / STATE_FILE) or {})


def _rows(state: dict) -> list[dict]:
    datasets = state.get("datasets")
    return [{"dataset": name, **entry} for name, entry in sorted(datasets.items())] if isinstance(datasets, dict) else []
