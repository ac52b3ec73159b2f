"""Live mode (`ptyflow run --follow`): a scan reconstructed while it is written, in each layout a
detector writes (tests/acquisition.py), against the offline run of the finished file."""

import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from acquisition import Acquisition, Plan, live_config, read_dataset, start_subprocess
from conftest import cli
from ptycho_core.arrivals import Arrivals
from ptycho_core.checkpoint import read_checkpoint
from ptycho_core.io.calibration import load_run_config
from ptycho_core.io.preprocess import read_preprocessed
from ptycho_core.io.readers import follow_patterns, open_patterns
from ptycho_core.quality import phase_pearson, scanned_field_mask
from ptycho_core.rundir import newest_checkpoint
from ptycho_core.simulate import read_ground_truth
from ptycho_core.stages.live import AcquisitionStopped, LiveState, live_segment_ends, look, prepare_live
from ptycho_core.stages.segment import run_segment

FAST = 2000.0  # frames per second: the writer is never what a test waits for


def _config(small_dataset, plan: Plan, tmp_path: Path, **changes) -> Path:
    raw = live_config(small_dataset, plan, **changes)
    path = tmp_path / f"{plan.layout}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _write(small_dataset, plan: Plan) -> Acquisition:
    patterns, positions, _ = read_dataset(Path(small_dataset).parent / "data.h5")
    return Acquisition(patterns, positions, plan)


def _follow(config_path: Path, run_dir: Path, iterations_per_look: int = 1) -> LiveState:
    """The live stages without Prefect, as tasks/live.py drives them; returns the final state."""
    cfg = load_run_config(config_path)
    state = prepare_live(cfg, run_dir, sleep=lambda s: time.sleep(min(s, 0.05)))
    while state.acquiring:
        ckpt = newest_checkpoint(run_dir)
        outcome = run_segment(run_dir, (ckpt.iteration if ckpt else 0) + iterations_per_look, figures=False)
        state = look(cfg, run_dir, state, outcome.iteration)
    return state


def _pearson(run_dir: Path, small_dataset) -> float:
    """Phase Pearson of run_dir's newest checkpoint against the simulation's truth."""
    truth = read_ground_truth(Path(small_dataset).parent / "data.h5")["objp"][0].sum(0)
    prep = read_preprocessed(run_dir / "preprocessed.h5")
    phase = read_checkpoint(run_dir / "model.hdf5").tensors["objp"][0].numpy().sum(0)
    return phase_pearson(phase, truth, scanned_field_mask(prep.geometry.positions_px, prep.geometry.canvas_shape))


# ----------------------------------------------------------------------------------- reading
@pytest.mark.parametrize("layout", ["mib", "dectris"])
def test_a_followed_file_reads_as_the_finished_file_does_and_leaves_out_the_frame_being_written(
        small_dataset, tmp_path, layout):
    plan = Plan(layout=layout, out_dir=str(tmp_path / "data"), frames_per_s=FAST, frames_per_file=40)
    _write(small_dataset, plan).run()
    cfg = load_run_config(_config(small_dataset, plan, tmp_path))
    if layout == "mib":  # half a frame more, as the detector is writing it: still 256 whole ones
        cut, whole = plan.data_path, plan.data_path.read_bytes()
        cut.write_bytes(whole + b"MQ1," + b"0" * 500)
        expected = 256
    else:  # the third data file half-written, as a writer leaves it mid-write
        cut = plan.data_path.with_name("scan_data_000003.h5")
        whole = cut.read_bytes()
        cut.write_bytes(whole[:len(whole) // 2])
        expected = 80
    growing = follow_patterns(cfg.data)
    try:
        assert growing.n_patterns == expected
        growing.read(np.arange(expected))
    finally:
        growing.close()
    cut.write_bytes(whole)  # the writer finishes
    finished, followed = open_patterns(cfg.data), follow_patterns(cfg.data)
    try:
        everything = np.arange(finished.n_patterns)
        assert followed.n_patterns == finished.n_patterns == 256
        np.testing.assert_array_equal(followed.read(everything), finished.read(everything))
    finally:
        finished.close()
        followed.close()


# ----------------------------------------------------------------------------------- batches
def test_while_acquiring_the_rows_behind_are_drawn_first_so_visits_stay_level():
    candidates = np.arange(64)
    history = {"patterns_in": [], "acquiring": []}
    arrivals_seen = [16, 16, 16, 16, 32, 32, 48, 64, 64, 64, 64]  # rows of 16 arriving between iterations
    per_row = []
    for acquired in arrivals_seen:
        pool, fields = Arrivals(acquired, True).draw(history, candidates, 64)
        for key, value in fields.items():
            history[key].append(value)
        per_row.append(Arrivals(64, True).visits(history, candidates, 64).reshape(4, 16)[:, 0].tolist())
    # the first row had 4 iterations alone; it is not drawn again until the later rows caught up
    assert [visits[0] for visits in per_row] == [1, 2, 3, 4] + [4] * 7
    assert per_row[8] == [4, 4, 3, 2] and per_row[-1] == [4, 4, 4, 4]
    naive = sum(np.arange(64) < a for a in arrivals_seen)  # every acquired pattern every time
    assert naive.reshape(4, 16)[:, 0].tolist() == [11, 7, 5, 4]  # what the rule avoids
    # once acquisition is over every iteration draws every pattern, whatever the visits
    pool, _ = Arrivals(64, False).draw(history, candidates, 64)
    assert np.array_equal(pool, candidates)
    # an iteration stopped part-way keeps the arrivals it began with
    pool, fields = Arrivals(64, True).draw(history, candidates, 64, in_progress=(16, True))
    assert fields["patterns_in"] == 16 and pool.max() < 16


# ----------------------------------------------------------------------------------- bad input
def test_a_truncated_data_file_is_read_again_later_and_the_run_completes(small_dataset, tmp_path):
    plan = Plan(layout="dectris", out_dir=str(tmp_path / "data"), frames_per_s=FAST, frames_per_file=64,
                truncated_s=0.4)
    writer = _write(small_dataset, plan).start()
    try:
        while not plan.data_path.exists():
            time.sleep(0.01)
        state = _follow(_config(small_dataset, plan, tmp_path, live={"timeout_s": 20, "poll_s": 0.05}),
                        tmp_path / "run")
    finally:
        writer.stop()
    assert state.acquisition == "complete" and state.acquired == 256
    prep = read_preprocessed(tmp_path / "run" / "preprocessed.h5")
    patterns, _, _ = read_dataset(Path(small_dataset).parent / "data.h5")
    np.testing.assert_allclose(prep.measurements.read(np.arange(256)), np.round(patterns.reshape(256, 64, 64)))


def test_a_writer_that_stops_short_is_reported_and_finished_only_when_the_config_says_so(small_dataset, tmp_path):
    plan = Plan(layout="mib", out_dir=str(tmp_path / "data"), frames_per_s=FAST, rows=6, marker=True)
    _write(small_dataset, plan).run()
    config = _config(small_dataset, plan, tmp_path, live={"timeout_s": 30, "poll_s": 0.05})
    with pytest.raises(AcquisitionStopped, match=r"ended short: scan\.mib\.done marks the scan done, with 96 of 256 "
                                                 r"planned patterns \(6 of 16 rows\); iteration 1 is checkpointed"):
        _follow(config, tmp_path / "run")
    assert read_preprocessed(tmp_path / "run" / "preprocessed.h5").acquisition == "acquiring"  # kept, not finished

    finishing = _config(small_dataset, plan, tmp_path, live={"timeout_s": 30, "poll_s": 0.05, "finish_incomplete": True},
                        recon_params={"segment_iterations": 2})
    state = _follow(finishing, tmp_path / "run")  # the rerun with the setting finishes on what exists
    assert state.acquisition == "ended short" and state.acquired == 96
    cfg = load_run_config(finishing)
    for end in live_segment_ends(cfg, state, state.completed_at)[:1]:
        run_segment(tmp_path / "run", end, figures=False)
    history = read_checkpoint(tmp_path / "run" / "model.hdf5").history
    assert history["patterns_in"][-1] == 96 and history["acquiring"][-1] == 0.0


def test_a_writer_that_stalls_ends_the_run_with_its_state_within_the_timeout(small_dataset, tmp_path):
    plan = Plan(layout="mib", out_dir=str(tmp_path / "data"), frames_per_s=FAST, rows=4)  # no marker: silent
    _write(small_dataset, plan).run()
    config = _config(small_dataset, plan, tmp_path, live={"timeout_s": 1.5, "poll_s": 0.05})
    started = time.time()
    with pytest.raises(AcquisitionStopped, match=r"scan\.mib has not changed for \d+ s \(live\.timeout_s 1\.5\), with "
                                                 r"64 of 256 planned patterns \(4 of 16 rows\)"):
        _follow(config, tmp_path / "run")
    assert time.time() - started < 30


# ----------------------------------------------------------------------------------- whole runs
def _run_follow(config: Path, run_dir: Path, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(cli("run", config, "--run-dir", run_dir, "--follow"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["hdf5", "mib", "dectris"])
def test_a_live_run_on_a_growing_file_reaches_the_offline_quality(small_dataset, tmp_path, layout):
    data_h5 = Path(small_dataset).parent / "data.h5"
    plan = Plan(layout=layout, out_dir=str(tmp_path / "data"), frames_per_s=12.0, meta={"energy_kev": 300.0},
                truth_from=str(data_h5))
    config = _config(small_dataset, plan, tmp_path, live={"timeout_s": 60, "poll_s": 0.1})
    run = _run_follow(config, tmp_path / "live")  # waits for the data file to appear
    time.sleep(2.0)
    writer = start_subprocess(data_h5, plan)  # 256 frames at 12/s: about 21 s of acquisition
    out, _ = run.communicate(timeout=600)
    writer.communicate(timeout=60)
    assert run.returncode == 0, out
    live_history = read_checkpoint(tmp_path / "live" / "model.hdf5").history
    acquiring = np.asarray(live_history["acquiring"])
    assert acquiring[0] == 1.0 and live_history["patterns_in"][0] < 256  # it did start before the scan ended
    offline = subprocess.run(cli("run", config, "--run-dir", tmp_path / "offline"), capture_output=True, text=True)
    assert offline.returncode == 0, offline.stdout + offline.stderr
    live_q, offline_q = _pearson(tmp_path / "live", small_dataset), _pearson(tmp_path / "offline", small_dataset)
    assert live_q > offline_q - 0.01, (live_q, offline_q)
    # the same iterations over all patterns after completion as the offline run does in all
    assert int((acquiring == 0).sum()) == yaml.safe_load(config.read_text())["recon_params"]["iterations"]
    # a checkpoint per look while acquiring, but only the newest two of those are kept
    assert len(list((tmp_path / "live" / "checkpoints").glob("iter_*.h5"))) <= 2 + 3


@pytest.mark.slow
def test_a_live_run_stopped_by_sigterm_mid_acquisition_resumes_and_finishes_as_well(small_dataset, tmp_path):
    data_h5 = Path(small_dataset).parent / "data.h5"
    plan = Plan(layout="hdf5", out_dir=str(tmp_path / "data"), frames_per_s=16.0, truth_from=str(data_h5))
    config = _config(small_dataset, plan, tmp_path, live={"timeout_s": 60, "poll_s": 0.1})
    run = _run_follow(config, tmp_path / "live")
    time.sleep(2.0)
    writer = start_subprocess(data_h5, plan)  # 16 s of acquisition
    deadline = time.time() + 120
    while time.time() < deadline and not list((tmp_path / "live" / "checkpoints").glob("iter_*.h5")):
        time.sleep(0.2)
    time.sleep(1.0)
    run.send_signal(signal.SIGTERM)
    out, _ = run.communicate(timeout=120)
    assert run.returncode == 143, out
    stopped_at = read_preprocessed(tmp_path / "live" / "preprocessed.h5")
    assert stopped_at.acquisition == "acquiring" and stopped_at.acquired < 256, out
    again = _run_follow(config, tmp_path / "live")  # the same command: catches up with what arrived meanwhile
    out, _ = again.communicate(timeout=600)
    writer.communicate(timeout=60)
    assert again.returncode == 0, out
    offline = subprocess.run(cli("run", config, "--run-dir", tmp_path / "offline"), capture_output=True, text=True)
    assert offline.returncode == 0, offline.stdout + offline.stderr
    live_q, offline_q = _pearson(tmp_path / "live", small_dataset), _pearson(tmp_path / "offline", small_dataset)
    assert live_q > offline_q - 0.01, (live_q, offline_q)


@pytest.mark.slow
def test_a_stalled_writer_ends_ptyflow_run_with_exit_code_7_and_one_line(small_dataset, tmp_path):
    plan = Plan(layout="mib", out_dir=str(tmp_path / "data"), frames_per_s=FAST, rows=5)
    _write(small_dataset, plan).run()
    config = _config(small_dataset, plan, tmp_path, live={"timeout_s": 3, "poll_s": 0.1})
    result = subprocess.run(cli("run", config, "--run-dir", tmp_path / "run", "--follow"), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 7, result.stdout + result.stderr
    lines = [line for line in (result.stdout + result.stderr).splitlines() if "acquisition ended short" in line]
    assert len(lines) == 1 and "80 of 256 planned patterns (5 of 16 rows)" in lines[0], result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def test_centring_and_normalization_fixed_from_the_first_rows_are_refined_at_completion(small_dataset, tmp_path,
                                                                                          caplog):
    plan = Plan(layout="mib", out_dir=str(tmp_path / "data"), frames_per_s=FAST)
    patterns, positions, _ = read_dataset(Path(small_dataset).parent / "data.h5")
    shifted = np.roll(patterns, (3, -2), axis=(2, 3))  # a bright-field disk off the detector's centre
    shifted[:2] = np.roll(shifted[:2], (4, 0), axis=(2, 3)) * 0.5  # first rows: further off, and darker
    writer = Acquisition(shifted, positions, plan).start()
    steps = {"center_bf_disk": True, "normalize": "mean_sum"}
    config = _config(small_dataset, plan, tmp_path, live={"timeout_s": 20, "poll_s": 0.05, "first_rows": 2},
                     preprocess=steps)
    writer.join(30)
    cfg = load_run_config(config)
    run_dir = tmp_path / "run"
    started = prepare_live(cfg, run_dir)
    first_rows = read_preprocessed(run_dir / "preprocessed.h5").notes
    with caplog.at_level("INFO", logger="ptyflow"):
        state = look(cfg, run_dir, started, 0)
    assert state.acquisition == "complete"
    assert any("refined on all 256 acquired patterns" in r.message and "normalized_by" in r.message
               for r in caplog.records), [r.message for r in caplog.records]
    from ptycho_core.io.preprocess import preprocess

    offline = preprocess(cfg)  # the finished file, preprocessed in one go
    live_prep = read_preprocessed(run_dir / "preprocessed.h5")
    # fixed from the first rows, then refined to what the whole set gives
    assert first_rows["bf_disk_shift_px"] != offline.notes["bf_disk_shift_px"]
    assert first_rows["normalized_by"] != pytest.approx(offline.notes["normalized_by"], rel=1e-3)
    assert live_prep.notes["bf_disk_shift_px"] == offline.notes["bf_disk_shift_px"]
    assert live_prep.notes["normalized_by"] == pytest.approx(offline.notes["normalized_by"], rel=1e-6)
    np.testing.assert_allclose(live_prep.measurements.read(np.arange(256)), offline.measurements.read(np.arange(256)),
                               rtol=1e-5, atol=1e-9)


@pytest.mark.slow
def test_every_look_publishes_a_preview_under_one_key_with_the_phase_and_the_loss_as_images(
        small_dataset, tmp_path, in_prefect):
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.reconstruct import reconstruct
    from tasks.live import preview_key

    plan = Plan(layout="mib", out_dir=str(tmp_path / "data"), frames_per_s=10.0)  # about 25 s
    writer = start_subprocess(Path(small_dataset).parent / "data.h5", plan)  # as a detector's: apart from the flow
    while not plan.data_path.exists():
        assert writer.poll() is None, writer.communicate()
        time.sleep(0.01)
    cfg = load_run_config(_config(small_dataset, plan, tmp_path, live={"timeout_s": 30, "poll_s": 0.05},
                                  recon_params={"iterations": 4, "segment_iterations": 4}))
    run_dir = tmp_path / "run"
    try:
        summary = reconstruct(cfg.to_dict(), str(run_dir), follow=True)
    finally:
        if writer.poll() is None:
            writer.terminate()
        writer.communicate(timeout=60)
    history = read_checkpoint(run_dir / "model.hdf5").history
    looks = int(sum(history["acquiring"]))
    assert summary["iteration"] == looks + 4 and looks >= 2

    async def previews():
        async with get_client() as client:
            return await client.read_artifacts(artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=[preview_key(str(run_dir))])))

    found = asyncio.run(previews())
    assert len(found) == looks  # one version per look, all under the same key
    assert all(a.type == "markdown" and a.data.count("](data:image/png;base64,") == 2 for a in found)
    assert any("256 of 256 patterns acquired" not in a.data for a in found)


def test_a_preprocessed_file_damaged_while_rows_were_added_is_set_aside_and_made_again(small_dataset, tmp_path):
    plan = Plan(layout="mib", out_dir=str(tmp_path / "data"), frames_per_s=FAST, rows=8)
    _write(small_dataset, plan).run()
    cfg = load_run_config(_config(small_dataset, plan, tmp_path, live={"timeout_s": 30, "poll_s": 0.05}))
    run_dir = tmp_path / "run"
    prepare_live(cfg, run_dir)
    run_segment(run_dir, 1, figures=False)
    before = read_preprocessed(run_dir / "preprocessed.h5")
    patterns_before = before.measurements.read(np.arange(128))
    before.measurements.close()
    damaged = (run_dir / "preprocessed.h5").read_bytes()
    (run_dir / "preprocessed.h5").write_bytes(damaged[:len(damaged) // 3])  # as a SIGKILL mid-write may leave it
    warnings = []
    state = prepare_live(cfg, run_dir, warn=warnings.append)
    assert state.acquired == 128 and len(list(run_dir.glob("preprocessed.h5.damaged-*"))) == 1
    assert "could not be read" in warnings[0]
    again = read_preprocessed(run_dir / "preprocessed.h5")
    np.testing.assert_array_equal(again.measurements.read(np.arange(128)), patterns_before)
    np.testing.assert_array_equal(again.geometry.crop_pos, before.geometry.crop_pos)
    run_segment(run_dir, 2, figures=False)  # the checkpoint of the first run continues on it


@pytest.mark.slow
def test_a_watched_inbox_in_live_mode_reconstructs_a_scan_while_it_is_written(small_dataset, tmp_path, in_prefect):
    from flows.watch import watch

    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    plan = Plan(layout="mib", out_dir=str(inbox), frames_per_s=12.0, name="scan_live")  # about 21 s
    template = live_config(small_dataset, plan, live={"timeout_s": 30, "poll_s": 0.05},
                           recon_params={"iterations": 4, "segment_iterations": 4})
    # the writer in a process of its own, as a detector's is: a thread beside the flow (in CI once)
    # stopped writing for over 30 s with 13 of 16 rows written, and the run ended short
    writer = start_subprocess(Path(small_dataset).parent / "data.h5", plan)
    try:
        while not plan.data_path.exists():
            assert writer.poll() is None, writer.communicate()
            time.sleep(0.01)
        rows = {r["dataset"]: r for r in watch(str(inbox), str(outbox), template, stable_seconds=3600.0,
                                                deployment=None, live=True)}
    finally:
        if writer.poll() is None:
            writer.terminate()
        writer.communicate(timeout=60)
    assert rows["scan_live.mib"]["status"] == "done"  # taken at once, not after the size held still an hour
    history = read_checkpoint(outbox / "scan_live.mib" / "model.hdf5").history
    assert history["acquiring"][0] == 1.0 and history["patterns_in"][0] < 256 and history["patterns_in"][-1] == 256


def test_an_iteration_stopped_part_way_resumes_with_the_arrivals_it_began_with(small_dataset, tmp_path):
    from ptycho_core.rundir import Preempted

    def run_dir_with_8_rows(name):
        plan = Plan(layout="mib", out_dir=str(tmp_path / name / "data"), frames_per_s=FAST, rows=8)
        _write(small_dataset, plan).run()
        config = _config(small_dataset, plan, tmp_path / name, live={"timeout_s": 30}, recon_params={"threads": 1})
        cfg = load_run_config(config)
        prepare_live(cfg, tmp_path / name / "run")
        return plan, cfg, tmp_path / name / "run"

    def more_rows(plan, cfg, run_dir):  # 12 of the 16 rows: acquisition goes on
        _write(small_dataset, Plan(**{**plan.__dict__, "rows": 12})).run()
        assert look(cfg, run_dir, prepare_live(cfg, run_dir), 0).acquiring

    plan, cfg, straight = run_dir_with_8_rows("straight")
    run_segment(straight, 1, figures=False)
    run_segment(straight, 2, figures=False)  # iteration 2 on the 8 rows there when it began
    more_rows(plan, cfg, straight)
    run_segment(straight, 3, figures=False)

    plan, cfg, stopped = run_dir_with_8_rows("stopped")
    run_segment(stopped, 1, figures=False)
    batches = []
    with pytest.raises(Preempted):
        run_segment(stopped, 2, figures=False, stop_requested=lambda: batches.append(1) or len(batches) > 2)
    assert read_checkpoint(stopped / "model.hdf5").batch_cursor > 0
    more_rows(plan, cfg, stopped)  # more rows arrive while the run is stopped
    run_segment(stopped, 3, figures=False)

    a, b = read_checkpoint(straight / "model.hdf5"), read_checkpoint(stopped / "model.hdf5")
    assert a.history["patterns_in"] == b.history["patterns_in"] == [128.0, 128.0, 192.0]
    for name in a.tensors:
        assert torch.equal(a.tensors[name], b.tensors[name]), name
