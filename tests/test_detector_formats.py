"""Files detectors write: HDF5 compressed with bitshuffle-LZ4 (hdf5plugin), Dectris master files
with linked data files and the calibration they state; inspect-data and init-config."""

import json
import math
import subprocess
import sys
import tracemalloc
from pathlib import Path

import h5py
import hdf5plugin
import numpy as np
import pytest
import yaml

from ptycho_core.config import ConfigError
from ptycho_core.io.calibration import load_run_config
from ptycho_core.io.preprocess import preprocess
from ptycho_core.io.readers import DataError, describe_data, open_patterns
from ptycho_core.physics import wavelength_ang

from conftest import cli

SCAN, DET = (6, 8), 32
ENERGY_KEV, PIXEL_M, DISTANCE_M = 300.0, 75e-6, 0.15  # dk = atan(75 um / 150 mm) = 0.5 mrad
MASKED = [(3, 5), (20, 11)]


def counts(seed=0) -> np.ndarray:
    """(N, DET, DET) uint16 patterns with a bright-field disk and Poisson noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:DET, :DET] - DET // 2
    disk = ((yy**2 + xx**2) <= 7**2) * 400.0 + 5.0
    return rng.poisson(disk, size=(SCAN[0] * SCAN[1], DET, DET)).astype(np.uint16)


def write_dectris(folder: Path, patterns: np.ndarray, per_file: int = 20) -> Path:
    """A Dectris-style master file (NeXus layout as Arina/Eiger write it) whose data_NNNNNN entries
    are external links to data files compressed with bitshuffle-LZ4."""
    folder.mkdir(parents=True, exist_ok=True)
    master = folder / "scan_master.h5"
    with h5py.File(master, "w") as f:
        for i, start in enumerate(range(0, len(patterns), per_file)):
            name = f"scan_data_{i + 1:06d}.h5"
            with h5py.File(folder / name, "w") as data:
                data.create_dataset("entry/data/data", data=patterns[start:start + per_file],
                                    chunks=(1, DET, DET), **hdf5plugin.Bitshuffle(cname="lz4"))
            f[f"entry/data/data_{i + 1:06d}"] = h5py.ExternalLink(name, "/entry/data/data")
        det = f.create_group("entry/instrument/detector")
        for name, value, unit in (("x_pixel_size", PIXEL_M, "m"), ("y_pixel_size", PIXEL_M, "m"),
                                  ("detector_distance", DISTANCE_M, "m")):
            det[name] = value
            det[name].attrs["units"] = unit
        mask = np.zeros((DET, DET), dtype=np.uint32)
        for yx in MASKED:
            mask[yx] = 1
        det["detectorSpecific/pixel_mask"] = mask
        f["entry/instrument/beam/incident_wavelength"] = wavelength_ang(ENERGY_KEV)
        f["entry/instrument/beam/incident_wavelength"].attrs["units"] = "angstrom"
    return master


def config_file(folder: Path, data_path: Path, experiment: dict, **data) -> Path:
    raw = {"data": {"path": str(data_path), **data},
           "experiment": {"conv_angle_mrad": 2.5, "scan": {"shape": list(SCAN), "step_ang": 0.5}, **experiment},
           "recon_params": {"iterations": 1}}
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_a_dectris_master_file_reads_like_plain_hdf5_and_fills_the_calibration(tmp_path, monkeypatch):
    patterns = counts()
    master = write_dectris(tmp_path / "detector", patterns)
    with h5py.File(tmp_path / "plain.h5", "w") as f:
        f["meas"] = patterns
    monkeypatch.chdir(tmp_path)  # the links resolve next to the master file, wherever ptyflow runs
    # the config states neither energy nor dk nor bad pixels: the master file does
    dectris = load_run_config(config_file(tmp_path / "detector", master, {}))
    assert dectris.data.format == "auto" and math.isclose(dectris.experiment.energy_kev, ENERGY_KEV, rel_tol=1e-9)
    assert math.isclose(dectris.experiment.dk_mrad, math.atan(PIXEL_M / DISTANCE_M) * 1e3, rel_tol=1e-12)
    assert sorted(map(tuple, dectris.preprocess.bad_pixels)) == MASKED
    plain = load_run_config(config_file(tmp_path, tmp_path / "plain.h5", {
        "energy_kev": ENERGY_KEV, "dk_mrad": dectris.experiment.dk_mrad}))
    plain.preprocess.bad_pixels = [list(yx) for yx in MASKED]
    a, b = preprocess(dectris), preprocess(plain)
    assert np.array_equal(a.measurements.load(), b.measurements.load())
    # the energy comes back from the wavelength to 1e-15: dx agrees to the last digits
    assert math.isclose(a.dx_ang, b.dx_ang, rel_tol=1e-12) and np.array_equal(a.positions_ang, b.positions_ang)


def test_closing_a_dectris_source_closes_its_data_files(tmp_path):
    """A watcher or worker reads dataset after dataset in one process: a master's data files close
    with it. Left open, a rewritten data file could not be opened for writing here, and a later
    read of it would be handed the stale open copy."""
    master = write_dectris(tmp_path / "detector", counts())
    data = load_run_config(config_file(tmp_path, master, {})).data
    source = open_patterns(data)
    first = source.read(np.arange(3))
    source.close()
    with h5py.File(tmp_path / "detector" / "scan_data_000001.h5", "a") as f:
        f["entry/data/data"][0] = 7
    source = open_patterns(data)
    try:
        assert (source.read(np.arange(3))[0] == 7).all() and np.array_equal(source.read(np.arange(3))[1:], first[1:])
    finally:
        source.close()


def test_a_changed_dectris_data_file_stops_a_resume(tmp_path):
    """The input's record covers the master's data files: a pattern rewritten in one of them (the
    master's own bytes unchanged) is not resumed from the old preprocessed file."""
    from ptycho_core.rundir import RunDirError
    from ptycho_core.stages.prepare import prepare

    master = write_dectris(tmp_path / "detector", counts())
    config = load_run_config(config_file(tmp_path, master, {}))
    prepare(config, tmp_path / "run")
    prepare(config, tmp_path / "run")  # unchanged: the preprocessed file is used again
    with h5py.File(tmp_path / "detector" / "scan_data_000002.h5", "a") as f:
        f["entry/data/data"][3] = f["entry/data/data"][3][::-1]
    with pytest.raises(RunDirError, match="scan_master.h5 changed since it was preprocessed"):
        prepare(config, tmp_path / "run")


def test_a_run_recorded_by_an_older_ptyflow_from_a_dectris_master_alone_still_resumes(tmp_path):
    """A run directory whose input record covers the master file alone (as ptyflow recorded it
    before the data files were part of the input) is checked as it was recorded: a run in
    progress resumes after an upgrade, and the log says what its record covers."""
    from ptycho_core.io import preprocess as pp
    from ptycho_core.stages.prepare import prepare

    master = write_dectris(tmp_path / "detector", counts())
    config = load_run_config(config_file(tmp_path, master, {}))
    prepare(config, tmp_path / "run")
    older = {"path": str(master), "files": pp.stat_list(master, [master]),
             "sampled": pp.sampled_digest(master, [master]), "sha256": pp.content_digest(master, files=[master])}
    with h5py.File(tmp_path / "run" / "preprocessed.h5", "a") as f:
        assert len(json.loads(f.attrs["inputs"])[0]["files"]) == 4  # this ptyflow: the master and 3 data files
        f.attrs["inputs"] = json.dumps([older])
    outcome = prepare(config, tmp_path / "run")
    assert outcome.skipped and "scan_master.h5: the record, made by an older ptyflow, covers the master" in \
        outcome.input_check, outcome


def test_loading_a_config_opens_no_data_file_and_a_run_start_fills_it_in(tmp_path):
    """config.load_config reads YAML only: a config that leaves the beam energy to its data file
    is incomplete there, naming the field; load_run_config, where a run starts, fills it in."""
    from ptycho_core.config import load_config

    master = write_dectris(tmp_path / "detector", counts())
    path = config_file(tmp_path, master, {})
    with pytest.raises(ConfigError, match="experiment.energy_kev: required but missing"):
        load_config(path)
    assert math.isclose(load_run_config(path).experiment.energy_kev, ENERGY_KEV, rel_tol=1e-9)


def test_a_config_value_wins_over_the_file_and_a_disagreement_is_reported(tmp_path):
    master = write_dectris(tmp_path / "detector", counts())
    warnings = []
    cfg = load_run_config(config_file(tmp_path, master, {"energy_kev": 200.0, "dk_mrad": 0.502}), warn=warnings.append)
    assert cfg.experiment.energy_kev == 200.0 and cfg.experiment.dk_mrad == 0.502
    assert len(warnings) == 1, warnings  # 0.502 is within 1 % of the file's 0.5
    assert warnings[0].startswith("experiment.energy_kev: the config says 200 keV but scan_master.h5 states 300 keV")


def test_bitshuffle_lz4_hdf5_reads_and_a_missing_filter_names_the_package(tmp_path):
    patterns = counts(1)
    with h5py.File(tmp_path / "lz4.h5", "w") as f:
        f.create_dataset("meas", data=patterns, chunks=(1, DET, DET), **hdf5plugin.Bitshuffle(cname="lz4"))
    with h5py.File(tmp_path / "plain.h5", "w") as f:
        f["meas"] = patterns
    experiment = {"energy_kev": ENERGY_KEV, "dk_mrad": 0.5}
    compressed = preprocess(load_run_config(config_file(tmp_path, tmp_path / "lz4.h5", experiment)))
    plain = preprocess(load_run_config(config_file(tmp_path, tmp_path / "plain.h5", experiment)))
    assert np.array_equal(compressed.measurements.load(), plain.measurements.load())

    # without hdf5plugin (blocked) and no HDF5 plugin directory, the read fails: one message
    script = ("import sys; sys.modules['hdf5plugin'] = None\n"
              "from ptycho_core.io.calibration import load_run_config\nfrom ptycho_core.io.preprocess import preprocess\n"
              "from ptycho_core.io.readers import DataError\n"
              f"try:\n    preprocess(load_run_config({str(tmp_path / 'config.yaml')!r}))\n"
              "except DataError as exc:\n    print(exc)\n")
    config_file(tmp_path, tmp_path / "lz4.h5", experiment)
    env = {"HDF5_PLUGIN_PATH": str(tmp_path / "no-plugins"), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=Path.cwd())
    assert done.returncode == 0, done.stderr
    assert f"{tmp_path / 'lz4.h5'}:/meas: the patterns are compressed with an HDF5 filter" in done.stdout
    assert "pip install hdf5plugin" in done.stdout


def test_a_missing_data_file_of_a_master_file_is_named(tmp_path):
    master = write_dectris(tmp_path / "detector", counts())
    (tmp_path / "detector" / "scan_data_000002.h5").unlink()
    cfg = load_run_config(config_file(tmp_path, master, {"energy_kev": ENERGY_KEV, "dk_mrad": 0.5}))
    with pytest.raises(DataError, match=r"scan_master\.h5: /entry/data/data_000002 links to "
                                        r"scan_data_000002\.h5:/entry/data/data, which cannot be opened"):
        preprocess(cfg)


def test_reading_a_block_of_a_dectris_file_reads_only_that_block(tmp_path):
    patterns = np.tile(counts(), (20, 1, 1))  # 960 frames in 48 files of 20
    master = write_dectris(tmp_path / "detector", patterns)
    cfg = load_run_config(config_file(tmp_path, master, {"energy_kev": ENERGY_KEV, "dk_mrad": 0.5},
                                  scan_shape=[24, 40]))
    source = open_patterns(cfg.data)
    try:
        tracemalloc.start()
        block = source.read(np.arange(395, 405))  # spans two data files
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    finally:
        source.close()
    assert np.array_equal(block, patterns[395:405].astype(np.float32))
    # the whole file as float32 would be 3.9 MB; the read holds the block and a decoded chunk or two
    assert peak < 4 * block.nbytes < 4 * patterns.size / 20, peak


def test_inspect_data_and_init_config_on_a_dectris_file(tmp_path):
    master = write_dectris(tmp_path / "detector", counts())
    done = subprocess.run(cli("inspect-data", master, "--json"), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["format"] == "dectris" and report["shape"] == [SCAN[0] * SCAN[1], DET, DET]
    assert report["dtype"] == "uint16" and len(report["data_files"]) == 3
    assert math.isclose(report["calibration"]["energy_kev"], ENERGY_KEV, rel_tol=1e-9)
    assert report["calibration"]["bad_pixels"] == len(MASKED)
    assert describe_data(load_run_config(config_file(tmp_path, master, {})).data)["calibration"] == report["calibration"]

    starter = subprocess.run(cli("init-config", master), capture_output=True, text=True)
    assert starter.returncode == 0, starter.stderr
    text = starter.stdout
    assert "energy_kev: 300  # stated by the file" in text and "conv_angle_mrad: TODO" in text
    (tmp_path / "starter.yaml").write_text(text)
    with pytest.raises(ConfigError, match="experiment.conv_angle_mrad"):
        load_run_config(tmp_path / "starter.yaml")  # a TODO fails naming its field
    filled = (text.replace("conv_angle_mrad: TODO", "conv_angle_mrad: 2.5").replace("defocus_ang: TODO", "defocus_ang: 0")
              .replace("shape: [TODO, TODO]", "shape: [6, 8]").replace("step_ang: TODO", "step_ang: 0.5"))
    (tmp_path / "starter.yaml").write_text(filled)
    cfg = load_run_config(tmp_path / "starter.yaml")
    assert cfg.experiment.dk_mrad == pytest.approx(0.5, rel=1e-3) and preprocess(cfg).n_patterns == 48


def mib_frame(index: int, frame: np.ndarray) -> bytes:
    """One Merlin frame as the detector writes it: a 384-byte ASCII header (single chip), then the
    counts as big-endian uint16, rows in readout order."""
    thresholds = ["1.000000E+1"] + ["0.000000E+0"] * 7
    dacs = ["175", "511"] + ["000"] * 25
    fields = (["MQ1", f"{index + 1:06d}", "00384", "01", f"{frame.shape[1]:04d}", f"{frame.shape[0]:04d}", "U16",
               "   1x1", "01", "2026-11-26 12:00:00.000000", "0.000100", "0", "0", "0"] + thresholds + ["3RX"] + dacs
              + [f"2026-11-26T12:00:00.{index:09d}Z", "100000ns", "12", ""])
    header = ",".join(fields).encode("ascii")
    assert len(header) <= 384
    return header.ljust(384, b" ") + frame.astype(">u2").tobytes()


def write_mib(path: Path, patterns: np.ndarray, hdr_frames=None) -> Path:
    # RosettaSciIO shows frames flipped top to bottom from their readout order: store them so
    # that they read back as ``patterns``
    path.write_bytes(b"".join(mib_frame(i, p[::-1]) for i, p in enumerate(patterns)))
    if hdr_frames is not None:
        path.with_suffix(".hdr").write_text(
            "HDR,\t\nTime and Date Stamp (day, mnth, yr, hr, min, s):\t26/11/2026 12:00:00\n"
            f"Frames in Acquisition (Number):\t{hdr_frames}\nFrames per Trigger (Number):\t{SCAN[1]}\nEnd\t\n")
    return path


def test_a_merlin_mib_file_reads_like_plain_hdf5(tmp_path):
    patterns = counts(2)
    mib = write_mib(tmp_path / "scan.mib", patterns, hdr_frames=len(patterns))
    with h5py.File(tmp_path / "plain.h5", "w") as f:
        f["meas"] = patterns
    experiment = {"energy_kev": ENERGY_KEV, "dk_mrad": 0.5}
    (tmp_path / "m").mkdir()
    merlin = load_run_config(config_file(tmp_path / "m", mib, experiment, scan_shape=list(SCAN)))
    assert merlin.data.format == "auto" and describe_data(merlin.data)["format"] == "mib"
    plain = load_run_config(config_file(tmp_path, tmp_path / "plain.h5", experiment))
    assert np.array_equal(preprocess(merlin).measurements.load(), preprocess(plain).measurements.load())
    source = open_patterns(merlin.data)
    try:
        assert source.shape == (*SCAN, DET, DET)
        assert type(source.array).__module__.startswith("dask"), "the frames should be read lazily"
        assert np.array_equal(source.read(np.arange(9, 14)), patterns[9:14].astype(np.float32))
    finally:
        source.close()


def test_merlin_files_that_do_not_add_up_are_refused(tmp_path):
    patterns = counts(3)
    experiment = {"energy_kev": ENERGY_KEV, "dk_mrad": 0.5}
    write_mib(tmp_path / "scan.mib", patterns, hdr_frames=len(patterns) + 5)
    cfg = load_run_config(config_file(tmp_path, tmp_path / "scan.mib", experiment))
    with pytest.raises(DataError, match=rf"scan\.hdr: says {len(patterns) + 5} frames in the acquisition but "
                                        rf"scan\.mib holds {len(patterns)}"):
        preprocess(cfg)
    with open(tmp_path / "scan.mib", "ab") as fh:
        fh.write(b"\0" * 100)  # a frame cut short
    with pytest.raises(DataError, match="is not a whole number of 32x32 U16 frames of 2432 bytes"):
        preprocess(cfg)
    (tmp_path / "other.mib").write_bytes(b"XYZ" * 1000)
    with pytest.raises(DataError, match="not a Merlin .mib file"):
        preprocess(load_run_config(config_file(tmp_path, tmp_path / "other.mib", experiment)))


def write_emd(path: Path, cube: np.ndarray, step_ang: float, dq_inv_nm: float) -> Path:
    """An EMD 1.0 file as the published layout describes it (root version attributes, a group of
    emd_group_type 1 holding data and one dim vector per axis, each with name and units)."""
    with h5py.File(path, "w") as f:
        f.attrs.update(version_major=0, version_minor=2)
        group = f.create_group("data/datacube")
        group.attrs["emd_group_type"] = 1
        group.create_dataset("data", data=cube, chunks=(1, cube.shape[1], *cube.shape[2:]))
        axes = [("R_y", np.arange(cube.shape[0]) * step_ang / 10, "nm"),
                ("R_x", np.arange(cube.shape[1]) * step_ang / 10, "nm"),
                ("Q_y", (np.arange(cube.shape[2]) - cube.shape[2] // 2) * dq_inv_nm, "1/nm"),
                ("Q_x", (np.arange(cube.shape[3]) - cube.shape[3] // 2) * dq_inv_nm, "1/nm")]
        for i, (name, values, unit) in enumerate(axes, start=1):
            group[f"dim{i}"] = values
            group[f"dim{i}"].attrs.update(name=name, units=unit)
    return path


def test_an_emd_datacube_states_its_scan_and_detector_calibration(tmp_path):
    patterns = counts(4)
    dq_inv_nm = 0.5 / (wavelength_ang(ENERGY_KEV) * 1e3) * 10  # 0.5 mrad per pixel at 300 keV
    emd = write_emd(tmp_path / "cube.emd", patterns.reshape(*SCAN, DET, DET), 0.5, dq_inv_nm)
    raw = {"data": {"path": str(emd)}, "experiment": {"energy_kev": ENERGY_KEV, "conv_angle_mrad": 2.5},
           "recon_params": {"iterations": 1}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    cfg = load_run_config(tmp_path / "c.yaml")  # no scan, no dk: the file states both
    assert list(cfg.experiment.scan.shape) == list(SCAN) and cfg.experiment.scan.step_ang == pytest.approx(0.5)
    assert cfg.experiment.dk_mrad == pytest.approx(0.5, rel=1e-9)
    with h5py.File(tmp_path / "plain.h5", "w") as f:
        f["meas"] = patterns
    plain = load_run_config(config_file(tmp_path, tmp_path / "plain.h5", {"energy_kev": ENERGY_KEV, "dk_mrad": 0.5}))
    a, b = preprocess(cfg), preprocess(plain)
    assert np.array_equal(a.measurements.load(), b.measurements.load())
    assert np.allclose(a.positions_ang, b.positions_ang, atol=1e-9)


def test_the_emd_datacube_the_config_names_is_the_one_whose_calibration_is_read(tmp_path):
    """With two datacubes the file alone cannot say which is meant: data.meas_key does, for the
    patterns and for the calibration alike."""
    cube = counts(5).reshape(*SCAN, DET, DET)
    emd = write_emd(tmp_path / "two.emd", cube, 0.5, 0.5 / (wavelength_ang(ENERGY_KEV) * 1e3) * 10)
    with h5py.File(emd, "a") as f:
        f.copy("data/datacube", "data/other")
        f["data/other/dim1"][...] = f["data/other/dim1"][()] * 2  # another scan step: 1.0 Å
        f["data/other/dim2"][...] = f["data/other/dim2"][()] * 2
    raw = {"data": {"path": str(emd), "meas_key": "/data/other"},
           "experiment": {"energy_kev": ENERGY_KEV, "conv_angle_mrad": 2.5}, "recon_params": {"iterations": 1}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    cfg = load_run_config(tmp_path / "c.yaml")
    assert cfg.experiment.scan.step_ang == pytest.approx(1.0) and cfg.experiment.dk_mrad == pytest.approx(0.5)
    assert preprocess(cfg).n_patterns == SCAN[0] * SCAN[1]


PY4DSTEM_FILE = Path(__file__).with_name("data") / "py4dstem_datacube.h5"


def py4dstem_patterns() -> np.ndarray:
    """The patterns tests/data/make_py4dstem_file.py gave py4DSTEM: (3, 4, 16, 16) uint16."""
    return (np.arange(3 * 4 * 16 * 16, dtype=np.uint32) % 97).astype(np.uint16).reshape(3, 4, 16, 16)


def test_a_py4dstem_file_reads_with_its_calibration_and_scan_rotation(tmp_path):
    """tests/data/py4dstem_datacube.h5 was written by py4DSTEM 0.14.18 itself (emdfile layout:
    'array' groups, dim vectors numbered from 0, a calibration in the root's metadatabundle)."""
    energy = 200.0
    raw = {"data": {"path": str(PY4DSTEM_FILE)}, "experiment": {"energy_kev": energy, "conv_angle_mrad": 3.0},
           "recon_params": {"iterations": 1}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    cfg = load_run_config(tmp_path / "c.yaml")
    assert describe_data(cfg.data)["format"] == "emd"
    scan = cfg.experiment.scan
    assert list(scan.shape) == [3, 4] and scan.step_ang == pytest.approx(0.5) and scan.rotation_deg == pytest.approx(12.5)
    assert cfg.experiment.dk_mrad == pytest.approx(0.025 * wavelength_ang(energy) * 1e3, rel=1e-9)

    with h5py.File(tmp_path / "plain.h5", "w") as f:
        f["meas"] = py4dstem_patterns()
    plain = {**raw, "data": {"path": str(tmp_path / "plain.h5")},
             "experiment": {**raw["experiment"], "dk_mrad": cfg.experiment.dk_mrad,
                            "scan": {"shape": [3, 4], "step_ang": 0.5, "rotation_deg": 12.5}}}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(plain))
    a, b = preprocess(cfg), preprocess(load_run_config(tmp_path / "p.yaml"))
    assert np.array_equal(a.measurements.load(), b.measurements.load())
    assert np.allclose(a.positions_ang, b.positions_ang, atol=1e-9)

    # a config that states another rotation wins, and the disagreement is reported
    raw["experiment"]["scan"] = {"shape": [3, 4], "step_ang": 0.5, "rotation_deg": -3.0}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    warnings: list[str] = []
    assert load_run_config(tmp_path / "c.yaml", warn=warnings.append).experiment.scan.rotation_deg == -3.0
    assert any("rotation_deg: the config says -3° but py4dstem_datacube.h5 states 12.5°" in w for w in warnings)

    # QR_flip (patterns transposed relative to the scan) is reported, and no rotation is guessed
    flipped = tmp_path / "flipped.h5"
    flipped.write_bytes(PY4DSTEM_FILE.read_bytes())
    with h5py.File(flipped, "a") as f:
        f["datacube_root/metadatabundle/calibration/QR_flip"][()] = True
    raw = {**raw, "data": {"path": str(flipped)}, "experiment": {"energy_kev": energy, "conv_angle_mrad": 3.0}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    warnings.clear()
    assert load_run_config(tmp_path / "c.yaml", warn=warnings.append).experiment.scan.rotation_deg == 0.0
    assert any("transposed relative to the scan (QR_flip)" in w for w in warnings), warnings


# --------------------------------------------------------------------------- Gatan .dm4
def dq_inv_ang(dk_mrad: float, energy_kev: float) -> float:
    return dk_mrad * 1e-3 / wavelength_ang(energy_kev)  # small angles: q = theta / lambda


def test_a_gatan_dm4_file_reads_like_plain_hdf5_with_its_calibration(tmp_path):
    """tests/dm_file.py writes DM4 from the format description; RosettaSciIO (which ptyflow reads
    it through) must find in it the 4D image, its axis calibrations and the microscope's voltage."""
    from dm_file import image, write_dm4

    patterns = counts(6)
    cube = patterns.reshape(*SCAN, DET, DET)
    haadf = image(np.ones(SCAN, np.float32), [0.05, 0.05], ["nm", "nm"], "HAADF")
    dq_nm = dq_inv_ang(0.5, ENERGY_KEV) * 10
    four_d = image(cube, [0.05, 0.05, dq_nm, dq_nm], ["nm", "nm", "1/nm", "1/nm"], "4D STEM",
                   {"Microscope Info": {"Voltage": ENERGY_KEV * 1e3, "STEM Camera Length": 91.0}})
    dm4 = write_dm4(tmp_path / "scan.dm4", [haadf, four_d])
    raw = {"data": {"path": str(dm4)}, "experiment": {"conv_angle_mrad": 2.5}, "recon_params": {"iterations": 1}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    cfg = load_run_config(tmp_path / "c.yaml")  # energy, dk and the scan all come from the file
    assert cfg.data.format == "auto" and describe_data(cfg.data)["format"] == "dm"
    assert cfg.experiment.energy_kev == pytest.approx(ENERGY_KEV)
    assert cfg.experiment.dk_mrad == pytest.approx(0.5, rel=1e-6)  # the file's 1/nm are float32
    assert list(cfg.experiment.scan.shape) == list(SCAN) and cfg.experiment.scan.step_ang == pytest.approx(0.5)
    with h5py.File(tmp_path / "plain.h5", "w") as f:
        f["meas"] = patterns
    plain = load_run_config(config_file(tmp_path, tmp_path / "plain.h5", {"energy_kev": ENERGY_KEV, "dk_mrad": 0.5}))
    assert np.array_equal(preprocess(cfg).measurements.load(), preprocess(plain).measurements.load())

    # two 4D images: the file alone cannot say which, data.meas_key names one by its name
    write_dm4(tmp_path / "two.dm4", [four_d, image(cube[::-1].copy(), [0.1, 0.1, dq_nm, dq_nm],
                                                   ["nm", "nm", "1/nm", "1/nm"], "other",
                                                   {"Microscope Info": {"Voltage": ENERGY_KEV * 1e3}})])
    raw["data"]["path"] = str(tmp_path / "two.dm4")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw | {"experiment": {"energy_kev": 300, "conv_angle_mrad": 2.5,
                                                                          "dk_mrad": 0.5}}))
    with pytest.raises(DataError, match="two.dm4: set data.meas_key to the name of the image of patterns; 3D/4D "
                                        "images in the file: '4D STEM', 'other'"):
        preprocess(load_run_config(tmp_path / "c.yaml"))
    raw["data"]["meas_key"] = "other"
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    other = load_run_config(tmp_path / "c.yaml")
    assert other.experiment.scan.step_ang == pytest.approx(1.0)
    assert np.array_equal(open_patterns(other.data).read(np.arange(8)), cube[-1].astype(np.float32))


def test_reading_a_block_of_a_dm4_file_reads_only_that_block(tmp_path):
    from dm_file import image, write_dm4

    big = np.tile(counts(7), (20, 1, 1)).reshape(24, 40, DET, DET)  # 960 patterns, 2 MB
    dm4 = write_dm4(tmp_path / "big.dm4", [image(big, [0.05, 0.05, 0.2, 0.2], ["nm", "nm", "1/nm", "1/nm"], "4D")])
    cfg = load_run_config(config_file(tmp_path, dm4, {"energy_kev": ENERGY_KEV, "dk_mrad": 0.5}))
    source = open_patterns(cfg.data)
    try:
        tracemalloc.start()
        block = source.read(np.arange(395, 405))
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    finally:
        source.close()
    assert np.array_equal(block, big.reshape(-1, DET, DET)[395:405].astype(np.float32))
    # the read holds its two scan rows (80 patterns) as uint16 and the block as float32, not the 2 MB file
    assert peak < big.nbytes / 4, peak


# --------------------------------------------------------------------------- Thermo Fisher Velox
def write_velox(path: Path, frames: np.ndarray, metadata: dict, haadf: bool = True) -> Path:
    """A Velox .emd file in the layout RosettaSciIO reads: a Version JSON, /Data/Image/<id>/Data
    stored (ky, kx, frames) one frame per chunk, and the image's JSON metadata as bytes in column
    0 of /Data/Image/<id>/Metadata."""
    def metadata_bytes(meta: dict) -> np.ndarray:
        return np.frombuffer(json.dumps(meta).encode(), np.uint8).reshape(-1, 1)

    with h5py.File(path, "w") as f:
        f["Version"] = np.array([json.dumps({"format": "Velox", "version": "11"}).encode()])
        stack = f.create_group("Data/Image/6d1e5a0c9a3b4a6f8e1f2d3c4b5a6978")
        stack.create_dataset("Data", data=frames.transpose(1, 2, 0), chunks=(*frames.shape[1:], 1))
        stack["Metadata"] = metadata_bytes(metadata)
        if haadf:  # a STEM image of the same scan, one frame
            image = f.create_group("Data/Image/0a9b8c7d6e5f40312a1b2c3d4e5f6a7b")
            image.create_dataset("Data", data=np.ones((*SCAN, 1), np.float32))
            image["Metadata"] = metadata_bytes({**metadata, "BinaryResult": {
                "PixelSize": {"width": "5e-11", "height": "5e-11"}, "PixelUnitX": "m", "PixelUnitY": "m",
                "Offset": {"x": "0", "y": "0"}}})
    return path


def velox_metadata(scan=SCAN) -> dict:
    dq_per_m = dq_inv_ang(0.5, ENERGY_KEV) * 1e10
    return {"Optics": {"AccelerationVoltage": str(ENERGY_KEV * 1e3), "CameraLength": "0.091"},
            "BinaryResult": {"PixelSize": {"width": repr(dq_per_m), "height": repr(dq_per_m)},
                             "PixelUnitX": "1/m", "PixelUnitY": "1/m", "Offset": {"x": "0", "y": "0"}},
            "Scan": {"ScanSize": {"width": str(scan[1]), "height": str(scan[0])}, "FrameTime": "0.5"},
            "Acquisition": {"AcquisitionStartDatetime": {"DateTime": "1764180000"}}}


def test_a_velox_file_reads_like_plain_hdf5_with_its_calibration(tmp_path):
    from rsciio.emd import file_reader

    patterns = counts(8)
    velox = write_velox(tmp_path / "scan.emd", patterns, velox_metadata())
    # the independent reader sees the same layout: the camera stack as (frames, ky, kx)
    stacks = [d["data"] for d in file_reader(str(velox), select_type="images") if np.ndim(d["data"]) == 3]
    assert len(stacks) == 1 and np.array_equal(stacks[0], patterns)

    raw = {"data": {"path": str(velox)}, "experiment": {"conv_angle_mrad": 2.5, "scan": {"shape": list(SCAN),
                                                                                        "step_ang": 0.5}},
           "recon_params": {"iterations": 1}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    cfg = load_run_config(tmp_path / "c.yaml")  # energy, dk and the scan shape from the file
    assert describe_data(cfg.data)["format"] == "velox" and describe_data(cfg.data)["scan_shape"] == list(SCAN)
    assert cfg.experiment.energy_kev == pytest.approx(ENERGY_KEV) and cfg.experiment.dk_mrad == pytest.approx(0.5)
    assert list(cfg.data.scan_shape) == list(SCAN)
    with h5py.File(tmp_path / "plain.h5", "w") as f:
        f["meas"] = patterns
    plain = load_run_config(config_file(tmp_path, tmp_path / "plain.h5", {"energy_kev": ENERGY_KEV, "dk_mrad": 0.5}))
    assert np.array_equal(preprocess(cfg).measurements.load(), preprocess(plain).measurements.load())

    # a scan shape that does not account for the frames is refused, naming both
    raw["data"]["scan_shape"] = [5, 8]
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(DataError, match=r"scan\.emd: holds 48 frames but data\.scan_shape \[5, 8\] needs 40"):
        preprocess(load_run_config(tmp_path / "c.yaml"))


def test_reading_a_block_of_a_velox_file_reads_only_that_block(tmp_path):
    frames = np.tile(counts(9), (20, 1, 1))  # 960 frames, one chunk each
    velox = write_velox(tmp_path / "big.emd", frames, velox_metadata((24, 40)), haadf=False)
    cfg = load_run_config(config_file(tmp_path, velox, {"energy_kev": ENERGY_KEV, "dk_mrad": 0.5}))
    source = open_patterns(cfg.data)
    try:
        tracemalloc.start()
        block = source.read(np.arange(395, 405))
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    finally:
        source.close()
    assert np.array_equal(block, frames[395:405].astype(np.float32))
    assert peak < frames.nbytes / 4, peak  # two scan rows of frames, not the 2 MB file


def test_every_format_a_reader_knows_is_a_config_choice():
    from typing import get_args

    from ptycho_core.config import DataParams
    from ptycho_core.io.readers import EXTENSIONS, FORMATS

    assert get_args(DataParams.model_fields["format"].annotation) == ("auto", *FORMATS)
    assert set(EXTENSIONS.values()) <= set(FORMATS)
