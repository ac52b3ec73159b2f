"""The watched inbox's state (flows.bookkeeping.inbox) with several watchers and a stuck lock: datasets
are hashed outside the lock, a claim is checked again after hashing, a lock that is not had
ends the claim with a message naming its holder. (The flow-level tests are in test_facility.py.)"""

import hashlib
import json
import os
import subprocess
import sys
import threading

import pytest

from flows.bookkeeping import inbox as inbox_state
from flows.bookkeeping.inbox import StateBusy, claim_due_datasets


def drop(inbox, name, data: bytes):
    """A complete dataset: its bytes, then its marker file."""
    (inbox / name).write_bytes(data)
    (inbox / f"{name}.done").touch()


def state_of(outbox):
    return json.loads((outbox / ".watch-state.json").read_text())["datasets"]


@pytest.fixture
def folders(tmp_path):
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    inbox.mkdir()
    return inbox, outbox


def test_a_watcher_polls_while_another_hashes_and_a_twin_hashed_meanwhile_is_a_duplicate(folders, monkeypatch):
    """Watcher A hashes a.h5; meanwhile the same bytes arrive as b.h5 and watcher B polls: B is not
    kept waiting (A hashes without the lock), skips a.h5 (A's claim) and claims b.h5. When A's
    hash is in, b.h5 already holds those bytes: a.h5 is recorded as its duplicate, so the bytes
    are reconstructed once."""
    inbox, outbox = folders
    data = os.urandom(3 << 20)
    drop(inbox, "a.h5", data)
    real_digest = inbox_state.content_digest
    other = {}

    def digest_while_another_polls(path, *args, **kwargs):
        if path.name == "a.h5":
            drop(inbox, "b.h5", data)
            poll = threading.Thread(target=lambda: other.update(due=claim_due_datasets(inbox, outbox, 0.0, ".done", 2)))
            poll.start()
            poll.join(30)  # with the lock held here, B would wait until A is done
            other["finished"] = not poll.is_alive()
        return real_digest(path, *args, **kwargs)

    monkeypatch.setattr(inbox_state, "content_digest", digest_while_another_polls)
    due = claim_due_datasets(inbox, outbox, 0.0, ".done", 2)
    assert other["finished"], "the second watcher waited for the first one's hashing"
    assert [entry["name"] for entry in other["due"]] == ["b.h5"]
    assert other["due"][0]["hash"] == hashlib.sha256(data).hexdigest()
    assert due == []
    state = state_of(outbox)
    assert state["a.h5"]["status"] == "duplicate" and state["a.h5"]["duplicate_of"] == "b.h5"
    assert state["b.h5"]["status"] == "claimed"


def test_a_file_that_changes_while_it_is_hashed_is_not_claimed_until_it_holds_still(folders, monkeypatch):
    inbox, outbox = folders
    drop(inbox, "a.h5", b"first part")
    real_digest = inbox_state.content_digest

    def digest_then_more_bytes_arrive(path, *args, **kwargs):
        digest = real_digest(path, *args, **kwargs)
        with open(path, "ab") as fh:
            fh.write(b", and more")
        return digest

    monkeypatch.setattr(inbox_state, "content_digest", digest_then_more_bytes_arrive)
    assert claim_due_datasets(inbox, outbox, 0.0, ".done", 2) == []
    assert state_of(outbox)["a.h5"]["status"] == "arriving"
    monkeypatch.setattr(inbox_state, "content_digest", real_digest)
    due = claim_due_datasets(inbox, outbox, 0.0, ".done", 2)
    assert [(e["name"], e["hash"]) for e in due] == [("a.h5", hashlib.sha256(b"first part, and more").hexdigest())]


HOLD_THE_STATE = (
    "import sys, time\n"
    "from flows.bookkeeping.inbox import locked_state\n"
    "with locked_state(sys.argv[1]):\n"
    "    print('held', flush=True)\n"
    "    time.sleep(60)\n"
)


def test_a_lock_held_by_another_watcher_ends_the_claim_naming_it(folders):
    inbox, outbox = folders
    drop(inbox, "a.h5", b"bytes")
    holder = subprocess.Popen([sys.executable, "-c", HOLD_THE_STATE, str(outbox)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(StateBusy, match=rf"\.watch-state\.lock is held by host \S+ PID {holder.pid} .*; "
                                            r"waited 0\.5 s for it"):
            claim_due_datasets(inbox, outbox, 0.0, ".done", 2, wait_s=0.5)
    finally:
        holder.kill()
        holder.wait(timeout=30)
    # the holder is gone (killed while holding): the lock is free again, and nothing was lost
    assert [e["name"] for e in claim_due_datasets(inbox, outbox, 0.0, ".done", 2, wait_s=0.5)] == ["a.h5"]


def test_a_dectris_acquisition_is_one_dataset_claimed_once_its_data_files_hold_still(folders):
    """A Dectris master file and its data files are one dataset, the master: the data files are not
    datasets of their own, and the master, whose own bytes are final from the start, is complete
    only once its data files stop growing. Its hash covers them, so an acquisition with the same
    master but other patterns is not taken for a duplicate."""
    from test_detector_formats import counts, write_dectris

    inbox, outbox = folders
    master = write_dectris(inbox, counts())
    assert inbox_state.candidates(inbox) == [master]
    assert claim_due_datasets(inbox, outbox, 0.0, "", 2) == []  # first sight: its size is noted
    with open(inbox / "scan_data_000003.h5", "ab") as fh:  # the last data file is still being written
        fh.write(b"more frames")
    assert claim_due_datasets(inbox, outbox, 0.0, "", 2) == []
    due = claim_due_datasets(inbox, outbox, 0.0, "", 2)
    assert [e["name"] for e in due] == ["scan_master.h5"]
    assert due[0]["hash"] != hashlib.sha256(master.read_bytes()).hexdigest()
    assert sorted(state_of(outbox)) == ["scan_master.h5"]


def test_a_data_file_not_written_yet_is_left_out_of_a_datasets_size_and_one_that_cannot_be_stated_is_an_error(folders, tmp_path):
    """The inbox and live mode list a dataset's files through one preprocess.stat_list: a Dectris
    data file that is not there yet leaves the size short (the claim waits for it to hold still),
    while a file that is there but cannot be stat'ed raises, instead of making the dataset look
    complete and smaller than it is."""
    import errno

    from ptycho_core.io.preprocess import stat_list
    from test_detector_formats import counts, write_dectris

    inbox, _ = folders
    master = write_dectris(inbox, counts())
    last = inbox / "scan_data_000003.h5"
    whole = inbox_state.size_of(master)
    aside = tmp_path / "aside.h5"
    last.rename(aside)
    assert inbox_state.size_of(master) == whole - aside.stat().st_size
    aside.rename(last)
    assert inbox_state.signature(master)[0] == whole
    assert stat_list(tmp_path, [tmp_path / "absent.h5"], missing_ok=True) == []
    with pytest.raises(OSError) as raised:
        stat_list(tmp_path, [tmp_path / ("x" * 5000)], missing_ok=True)  # a name no file system takes
    assert raised.value.errno == errno.ENAMETOOLONG
