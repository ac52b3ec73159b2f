"""The Prefect pipeline: staged runs that resume after SIGKILL/SIGTERM, lock, damaged files."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
import yaml

from ptycho_core.checkpoint import read_checkpoint
from ptycho_core.config import load_config
from ptycho_core.io.preprocess import preprocess
from ptycho_core.reconstruction import Reconstruction
from ptycho_core.rundir import RunDirError
from ptycho_core.runlock import lock_holder, run_lock

from conftest import cli
from serverkit import alive, descendants, wait, with_environment

ITERATIONS = 24
SEGMENT = 4


@pytest.fixture(scope="module")
def pipeline_config(tmp_path_factory, small_dataset):
    """The small preset, one thread (bitwise comparisons), short segments, a slower batch size."""
    raw = yaml.safe_load(Path(small_dataset).read_text())
    raw["data"]["path"] = str(Path(small_dataset).parent / raw["data"]["path"])
    raw["recon_params"].update(iterations=ITERATIONS, segment_iterations=SEGMENT, batch_size=8, threads=1)
    path = tmp_path_factory.mktemp("pipeline") / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def reference(pipeline_config):
    """Tensors of an uninterrupted in-process run of the same config."""
    before = torch.get_num_threads()
    cfg = load_config(pipeline_config)
    rec = Reconstruction.create(cfg, preprocess(cfg))
    rec.run(ITERATIONS)
    torch.set_num_threads(before)
    return {k: v.clone() for k, v in rec.model.tensors().items()}


def wait_for_checkpoint(run_dir, proc, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if list((run_dir / "checkpoints").glob("iter_*.h5")):
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended early: {proc.communicate()}")
        time.sleep(0.05)
    raise AssertionError("no checkpoint appeared")


def assert_equal_to_reference(run_dir, reference):
    final = read_checkpoint(run_dir / "model.hdf5")
    assert final.iteration == ITERATIONS and final.batch_cursor == 0
    for name, value in reference.items():
        assert torch.equal(final.tensors[name], value), name


def test_sigkill_mid_run_then_rerun_equals_uninterrupted(tmp_path, pipeline_config, reference, run_cli):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(cli("run", pipeline_config, "--run-dir", run_dir), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_for_checkpoint(run_dir, proc)
    time.sleep(random.uniform(0.0, 1.0))
    helpers = [pid for pid, _ in descendants(proc.pid)]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert helpers, "the embedded Prefect server should be a child of the run"
    deadline = time.monotonic() + 10
    while any(alive(p) for p in helpers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(p) for p in helpers), "a process outlived the killed run"
    done_before = read_checkpoint(run_dir / "model.hdf5").iteration
    assert done_before < ITERATIONS, "the kill came too late to test anything"

    rerun = run_cli("run", pipeline_config, "--run-dir", run_dir)
    assert rerun.returncode == 0, rerun.stderr
    assert "taking over the stale lock" in rerun.stderr  # the killed holder left its name behind
    assert_equal_to_reference(run_dir, reference)
    # finished segments were not redone: their files are the ones written before the kill
    assert (run_dir / "result.zarr").is_dir() and (run_dir / "figures" / "object_phase.png").is_file()


@pytest.mark.parametrize("sig, to_group", [(signal.SIGTERM, False), (signal.SIGTERM, True)],
                         ids=["SIGTERM to the run", "SIGTERM to its process group"])
def test_sigterm_checkpoints_reports_and_resumes(tmp_path, pipeline_config, reference, run_cli, sig, to_group):
    """A preemption during the iterations, with the embedded server. A batch scheduler signals every
    process of the job at once: the server, in the same job, must not go down before the run has
    recorded where it stopped (the run used to end in screens of connection errors)."""
    run_dir = tmp_path / "run"
    home = tmp_path / "prefect-home"
    env = {**os.environ, "PREFECT_HOME": str(home)}
    proc = subprocess.Popen(cli("run", pipeline_config, "--run-dir", run_dir), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    wait_for_checkpoint(run_dir, proc)
    time.sleep(random.uniform(0.0, 0.5))
    if to_group:
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, (stdout, stderr)
    import re

    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith("iterations ")]
    assert len(lines) == 1, stderr  # one line says where it stopped
    # the signal comes 0-0.5 s after the first checkpoint: mostly in the next segment's iterations, but
    # on a loaded machine (a demo beside the suite) it landed between the segments, in Prefect's calls
    match = (re.fullmatch(r"preempted at iteration (\d+)(?: \(\+(\d+) batches of iteration \d+\))? by SIGTERM; "
                          r"checkpoint .*; rerun the same command to resume", lines[0])
             or re.fullmatch(r"stopped by SIGTERM during Prefect's calls; iteration (\d+)()? is checkpointed in .*; "
                             r"rerun the same command to resume", lines[0]))
    assert match, stderr
    time.sleep(1)
    assert not with_environment("PREFECT_HOME", home), "a process outlived the run"
    iteration, batches = int(match.group(1)), int(match.group(2) or 0)
    written = read_checkpoint(run_dir / "model.hdf5")
    assert (written.iteration, written.batch_cursor) == (iteration, batches)
    name = f"iter_{iteration:06d}" + (f"_b{batches:04d}" if batches else "") + ".h5"
    assert (run_dir / "checkpoints" / name).is_file()

    rerun = run_cli("run", pipeline_config, "--run-dir", run_dir)
    assert rerun.returncode == 0, rerun.stderr
    assert_equal_to_reference(run_dir, reference)


def test_run_killed_under_a_server_is_marked_crashed_by_the_next_run(tmp_path, pipeline_config, reference,
                                                                     prefect_api, run_cli):
    """A SIGKILLed run leaves its flow run Running on a server that outlives it; the next run of the
    same directory finds it in the stale lock and closes it as Crashed."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    proc = subprocess.Popen(cli("run", pipeline_config, "--run-dir", run_dir), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    wait_for_checkpoint(run_dir, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed = json.loads((run_dir / ".lock").read_text())["flow_run_id"]

    def state_of(flow_run_id):
        return httpx.get(f"{prefect_api}/flow_runs/{flow_run_id}", timeout=10).json()["state"]

    assert state_of(killed)["type"] == "RUNNING"
    rerun = run_cli("run", pipeline_config, "--run-dir", run_dir)
    assert rerun.returncode == 0, rerun.stderr
    assert_equal_to_reference(run_dir, reference)
    state = state_of(killed)
    assert state["type"] == "CRASHED" and "died holding" in state["message"], state
    assert (run_dir / ".lock").read_text() == "", "a run that ends normally leaves no holder behind"


def test_damaged_newest_checkpoint_falls_back_and_is_kept(tmp_path, pipeline_config, reference, run_cli):
    run_dir = tmp_path / "run"
    first = run_cli("run", pipeline_config, "--run-dir", run_dir)
    assert first.returncode == 0, first.stderr
    newest = run_dir / "checkpoints" / f"iter_{ITERATIONS:06d}.h5"
    data = newest.read_bytes()
    os.unlink(run_dir / "model.hdf5")  # the hard link shares the data; damage only the checkpoint
    newest.write_bytes(data[: len(data) // 3])
    rerun = run_cli("run", pipeline_config, "--run-dir", run_dir)
    assert rerun.returncode == 0, rerun.stderr
    assert f"skipping damaged checkpoint {newest.name}" in rerun.stderr
    assert list((run_dir / "checkpoints").glob(f"{newest.name}.damaged-*")), "the damaged file must be kept"
    assert_equal_to_reference(run_dir, reference)


def test_second_run_is_refused_and_stale_lock_taken_over(tmp_path, pipeline_config, run_cli):
    run_dir = tmp_path / "run"
    with run_lock(run_dir):
        with pytest.raises(RunDirError, match=f"in use by host {os.uname().nodename} PID {os.getpid()}"):
            with run_lock(run_dir):
                pass
        refused = run_cli("run", pipeline_config, "--run-dir", run_dir)
    assert refused.returncode == 2
    assert f"in use by host {os.uname().nodename} PID {os.getpid()}" in refused.stderr
    assert "Traceback" not in refused.stderr and not (run_dir / "config.yaml").exists()

    with run_lock(run_dir, owner={"flow_run_id": "abc"}):
        holder, stale = lock_holder(run_dir)
        assert holder["pid"] == os.getpid() and holder["flow_run_id"] == "abc" and stale is None
    gone = subprocess.Popen(["true"])
    gone.wait()
    (run_dir / ".lock").write_text(f'{{"host": "{os.uname().nodename}", "pid": {gone.pid}, "since": "earlier"}}')
    # what inspect reports: nobody holds it, the text is what a dead process left
    assert lock_holder(run_dir) == (None, {"host": os.uname().nodename, "pid": gone.pid, "since": "earlier"})
    import logging

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("ptyflow").addHandler(handler)
    try:
        with run_lock(run_dir):
            pass
    finally:
        logging.getLogger("ptyflow").removeHandler(handler)
    assert any(f"PID {gone.pid}" in r.getMessage() and "stale lock" in r.getMessage() for r in records)


def test_other_input_in_same_run_dir_is_refused(tmp_path, pipeline_config, noise_free_dataset, run_cli):
    run_dir = tmp_path / "run"
    assert run_cli("run", pipeline_config, "--run-dir", run_dir).returncode == 0
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file() and p.name != ".lock"}
    other = run_cli("run", noise_free_dataset, "--run-dir", run_dir)
    assert other.returncode == 2 and "Traceback" not in other.stderr
    assert "different configuration" in other.stderr or "different input" in other.stderr, other.stderr
    after = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file() and p.name != ".lock"}
    assert before == after


def test_bad_config_is_one_line_without_traceback(tmp_path, run_cli):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {path: x.h5}\nexperiment: {energy_kev: 300, conv_angle_mrad: 20, dx_ang: 0.3}\n"
                   "model_params: {update_params: {probe: {start_iter: 1, lr: -1}}}\n")
    result = run_cli("run", bad, "--run-dir", tmp_path / "run")
    assert result.returncode == 2
    assert "model_params.update_params.probe.lr: must be >= 0" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()
    missing = tmp_path / "missing.yaml"
    missing.write_text(bad.read_text().replace("lr: -1", "lr: 0.001"))
    result = run_cli("run", missing, "--run-dir", tmp_path / "run")
    assert result.returncode == 2 and "x.h5: data file not found (data.path)" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()


def test_the_server_shows_the_cores_warnings_and_the_result_images(tmp_path, pipeline_config, prefect_api,
                                                                        run_cli):
    """ptycho_core warns through the `ptyflow` logger; inside a flow run that warning must be in
    the run's logs on the server (what the UI shows), not only on a console nobody watches."""
    raw = yaml.safe_load(Path(pipeline_config).read_text())
    raw["recon_params"].update(iterations=2, segment_iterations=2)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(raw))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    gone = subprocess.Popen(["true"])
    gone.wait()
    (run_dir / ".lock").write_text(f'{{"host": "{os.uname().nodename}", "pid": {gone.pid}, "since": "earlier"}}')
    done = run_cli("run", config, "--run-dir", run_dir)
    assert done.returncode == 0, done.stderr
    logs = httpx.post(f"{prefect_api}/logs/filter", json={"limit": 200, "sort": "TIMESTAMP_DESC"}, timeout=30).json()
    ours = [entry for entry in logs if f"taking over the stale lock of {run_dir}" in entry["message"]]
    assert ours, [entry["message"] for entry in logs][:20]
    assert ours[0]["flow_run_id"] and ours[0]["level"] == 30 and ours[0]["name"] == "ptyflow"
    run = httpx.get(f"{prefect_api}/flow_runs/{ours[0]['flow_run_id']}", timeout=30).json()
    assert run["name"] == f"reconstruct {tmp_path.name}/run"  # named after its run directory

    # the run's markdown artifact carries the phase and the loss curve themselves, not only file links
    artifacts = httpx.post(f"{prefect_api}/artifacts/filter", json={"limit": 50, "sort": "CREATED_DESC"},
                           timeout=30).json()
    mine = [a for a in artifacts if a["type"] == "markdown" and a["description"] == f"results of {run_dir}"]
    assert len(mine) == 1 and mine[0]["flow_run_id"] == ours[0]["flow_run_id"]
    import base64
    import io
    import re

    import matplotlib.image

    images = dict(re.findall(r"!\[(\w+)\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", mine[0]["data"]))
    assert set(images) == {"phase", "loss"}
    phase = matplotlib.image.imread(io.BytesIO(base64.b64decode(images["phase"])), format="png")
    assert 16 <= max(phase.shape[:2]) <= 192 and phase[..., 0].std() > 0.05  # an image, not a blank
    assert matplotlib.image.imread(io.BytesIO(base64.b64decode(images["loss"])), format="png").shape[1] == 256


POLL_A_DAMAGED_WATCH_STATE = """
import logging, sys
import flows.reconstruct, flows.sweep, flows.watch
print("handlers after import:", [type(h).__name__ for h in logging.getLogger("ptyflow").handlers], flush=True)
from flows.watch import watch
watch(sys.argv[1], sys.argv[2], sys.argv[3], stable_seconds=0.0, deployment=None)
"""


def test_importing_the_flows_changes_no_logging_and_a_watch_ships_the_cores_warnings(tmp_path, pipeline_config,
                                                                                    prefect_api):
    """Importing a flow module adds no handler (a library importing ptyflow keeps its logging as it
    was); a flow adds Prefect's handler itself, first thing: the warning of a watch whose state file
    was cut to nothing is in that watch run's logs on the server, in a process where no reconstruct
    flow ran before it."""
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    inbox.mkdir()
    outbox.mkdir()
    (outbox / ".watch-state.json").write_bytes(b"")
    done = subprocess.run([sys.executable, "-c", POLL_A_DAMAGED_WATCH_STATE, inbox, outbox, pipeline_config],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PREFECT_API_URL": prefect_api})
    assert done.returncode == 0, done.stderr
    assert "handlers after import: []" in done.stdout

    def shipped():
        logs = httpx.post(f"{prefect_api}/logs/filter", json={"limit": 200, "sort": "TIMESTAMP_DESC"},
                          timeout=30).json()
        return [entry for entry in logs
                if f"{outbox / '.watch-state.json'} could not be read; set aside" in entry["message"]]

    ours = wait(shipped, 30, "the watch's warning in the server's logs")
    assert ours[0]["name"] == "ptyflow" and ours[0]["level"] == 30
    run = httpx.get(f"{prefect_api}/flow_runs/{ours[0]['flow_run_id']}", timeout=30).json()
    assert run["name"] == f"watch {tmp_path.name}/inbox"


def test_a_progress_reporter_serves_only_the_flow_call_it_was_given_to(tmp_path, small_dataset, in_prefect):
    """The CLI's progress bar is given to its own flow call: a flow run in another thread of the
    same process meanwhile (flows run side by side in a notebook or a service) reports nothing to
    it, and after the call nothing does."""
    import threading

    from flows.reconstruct import reconstruct
    from tasks import progress

    class Seen:
        def __init__(self):
            self.iterations, self.segments = [], []

        def iteration_done(self, state, row):
            self.iterations.append(state.iteration)

        def segment_done(self, outcome):
            self.segments.append(outcome.iteration)

    raw = yaml.safe_load(Path(small_dataset).read_text())
    raw["data"]["path"] = str(Path(small_dataset).parent / raw["data"]["path"])
    raw["recon_params"].update(iterations=2, segment_iterations=2, segment_figures=False)
    bar, failures = Seen(), []

    def other_run():
        try:
            reconstruct(raw, str(tmp_path / "other"))
        except BaseException as exc:  # noqa: BLE001 - shown by the assertion below
            failures.append(exc)

    with progress.reporting_to(bar):
        other = threading.Thread(target=other_run)
        other.start()
        other.join()
        assert not failures and (tmp_path / "other" / "model.hdf5").is_file()
        assert bar.iterations == [] and bar.segments == []  # the other thread's run is not this call's
        reconstruct(raw, str(tmp_path / "mine"))
    assert bar.iterations == [1, 2] and bar.segments == [2]
    progress.iteration_done(None, {})
    progress.segment_done(None)
    assert bar.iterations == [1, 2] and bar.segments == [2]
