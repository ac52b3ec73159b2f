"""Data in: every reader gives the same preprocessed arrays; preprocessing steps; bad input."""

import math

import h5py
import numpy as np
import pytest
import yaml

from ptycho_core.config import config_from_dict, set_dotted
from ptycho_core.io.preprocess import bf_disk, preprocess
from ptycho_core.io.readers import DataError
from ptycho_core.physics import wavelength_ang
from ptycho_core.stages.prepare import prepare

SCAN = (4, 5)
DET = 32
STEP = 0.8


def synthetic(seed=0):
    """(scan_y, scan_x, 32, 32) counts with a bright-field disk, and (N, 2) positions in Å."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:DET, :DET] - DET // 2
    disk = (yy**2 + xx**2 <= 8**2) * 100.0
    patterns = rng.poisson(disk + 1.0, size=(*SCAN, DET, DET)).astype(np.float32)
    iy, ix = np.meshgrid(np.arange(SCAN[0]), np.arange(SCAN[1]), indexing="ij")
    positions = np.stack([iy.ravel(), ix.ravel()], 1) * STEP
    return patterns, positions


def base_config(path, **data):
    raw = {
        "data": {"path": str(path), **data},
        "experiment": {"energy_kev": 300, "conv_angle_mrad": 20, "dx_ang": 0.3},
    }
    return raw


def cfg(raw, **dotted):
    raw = yaml.safe_load(yaml.safe_dump(raw))
    for key, value in dotted.items():
        set_dotted(raw, key, value)
    return config_from_dict(raw)


def write_all_formats(tmp_path, patterns, positions):
    """The same data in every supported layout: {name: (raw config)}."""
    import scipy.io
    import tifffile
    import zarr

    flat = patterns.reshape(-1, DET, DET)
    configs = {}
    with h5py.File(tmp_path / "d4.h5", "w") as f:
        f["entry/patterns"] = patterns
        f["entry/pos"] = positions
    configs["hdf5_4d"] = base_config(tmp_path / "d4.h5", meas_key="/entry/patterns", pos_key="/entry/pos")
    with h5py.File(tmp_path / "d3.h5", "w") as f:
        f["meas"] = flat
        f["pos"] = positions
    configs["hdf5_3d"] = base_config(tmp_path / "d3.h5", pos_key="/pos")  # meas found as the only 3D dataset
    with h5py.File(tmp_path / "d.cxi", "w") as f:  # CXI 1.6: data and translations (x, y, z) in metres
        f.attrs["cxi_version"] = 160
        f["entry_1/data_1/data"] = flat
        translation = np.zeros((len(positions), 3))
        translation[:, 0], translation[:, 1] = positions[:, 1] * 1e-10, positions[:, 0] * 1e-10
        f["entry_1/sample_1/geometry_1/translation"] = translation
    configs["cxi"] = base_config(tmp_path / "d.cxi")
    np.save(tmp_path / "d.npy", patterns)
    np.save(tmp_path / "pos.npy", positions)
    configs["npy"] = base_config(tmp_path / "d.npy", pos_path=str(tmp_path / "pos.npy"), pos_key="pos")
    scipy.io.savemat(tmp_path / "d5.mat", {"dp": patterns, "pos": positions})
    configs["mat_v5"] = base_config(tmp_path / "d5.mat", meas_key="dp", pos_key="pos")
    with h5py.File(tmp_path / "d73.mat", "w", userblock_size=512) as f:  # MATLAB 7.3: HDF5, axes reversed
        f["dp"] = patterns.transpose()
        f["pos"] = positions.transpose()
    with open(tmp_path / "d73.mat", "r+b") as fh:
        fh.write(b"MATLAB 7.3 MAT-file, written by a test")
    configs["mat_v73"] = base_config(tmp_path / "d73.mat", meas_key="dp", pos_key="/pos")
    tifffile.imwrite(tmp_path / "d.tif", flat)
    np.savetxt(tmp_path / "pos.txt", positions)
    configs["tiff"] = base_config(tmp_path / "d.tif", pos_path=str(tmp_path / "pos.txt"), pos_key="pos",
                                  scan_shape=list(SCAN))
    tifffile.imwrite(tmp_path / "dz.tif", flat, compression="zlib")  # not memory-mappable: read page by page
    configs["tiff_zlib"] = base_config(tmp_path / "dz.tif", pos_path=str(tmp_path / "pos.txt"), pos_key="pos",
                                       scan_shape=list(SCAN))
    # compressed, not one 3D stack of one pattern per page: decoded a page at a time all the same
    tifffile.imwrite(tmp_path / "d4z.tif", patterns, compression="zlib")  # (4, 5, ky, kx): a pattern per page
    configs["tiff_4d_zlib"] = base_config(tmp_path / "d4z.tif", pos_path=str(tmp_path / "pos.txt"), pos_key="pos")
    tifffile.imwrite(tmp_path / "dpz.tif", patterns, compression="zlib", photometric="minisblack",
                     planarconfig="separate")  # a page per scan row, its 5 patterns as sample planes
    configs["tiff_planes_zlib"] = base_config(tmp_path / "dpz.tif", pos_path=str(tmp_path / "pos.txt"), pos_key="pos")
    zarr.save_array(str(tmp_path / "d.zarr"), patterns, zarr_format=3)
    configs["zarr"] = base_config(tmp_path / "d.zarr", pos_path=str(tmp_path / "pos.npy"), pos_key="pos")
    # EMPAD: float32 frames of 130 rows x 128 columns, the last two rows metadata; scan shape from config
    empad = np.zeros((len(flat), 130, 128), dtype="<f4")
    empad[:, 48:80, 48:80] = flat  # centred on the 128x128 detector; cropped back to 32x32
    empad[:, 128:, :] = 7.0e9  # metadata that must not leak into the patterns
    empad.tofile(tmp_path / "d.raw")
    configs["empad"] = base_config(tmp_path / "d.raw", pos_path=str(tmp_path / "pos.npy"), pos_key="pos",
                                   scan_shape=list(SCAN))
    return configs


def test_every_format_gives_identical_preprocessed_arrays(tmp_path):
    patterns, positions = synthetic()
    configs = write_all_formats(tmp_path, patterns, positions)
    results = {}
    for name, raw in configs.items():
        overrides = {"preprocess.target_size_px": DET} if name == "empad" else {}
        results[name] = preprocess(cfg(raw, **overrides))
    ref = results["hdf5_4d"]
    assert np.array_equal(ref.measurements.load(), patterns.reshape(-1, DET, DET))
    for name, prep in results.items():
        assert np.array_equal(prep.measurements.load(), ref.measurements.load()), name
        assert np.allclose(prep.positions_ang, ref.positions_ang, atol=1e-9), name
        assert np.array_equal(prep.geometry.crop_pos, ref.geometry.crop_pos), name


# ------------------------------------------------------------------ a format registered by a test
TOY_HEADER = 64  # bytes: b"TOY1 scan_y scan_x det energy_kev", padded with spaces


def _toy_header(path):
    with open(path, "rb") as fh:
        head = fh.read(TOY_HEADER)
    if not head.startswith(b"TOY1 "):
        raise DataError(f"{path}: not a toy file (no TOY1 header)")
    _, scan_y, scan_x, det, energy_kev = head.split()
    return (int(scan_y), int(scan_x), int(det)), float(energy_kev)


def _open_toy(path, data):
    from ptycho_core.io.formats import PatternSource

    (scan_y, scan_x, det), _ = _toy_header(path)
    frames = np.memmap(path, dtype="<u2", mode="r", offset=TOY_HEADER, shape=(scan_y, scan_x, det, det))
    return PatternSource(path, "(toy)", frames)


def _toy_positions(path):
    (scan_y, scan_x, det), _ = _toy_header(path)
    offset = TOY_HEADER + scan_y * scan_x * det * det * 2
    return np.fromfile(path, dtype="<f8", offset=offset).reshape(-1, 2), "(toy positions)"


@pytest.fixture
def toy_format():
    """A detector format ptyflow does not know, registered here and removed afterwards: a header
    stating the scan, detector and beam energy, uint16 counts, then the positions (Å, float64)."""
    from ptycho_core.io.formats import EXTENSIONS, READERS, DataFormat, register_format

    fmt = register_format(DataFormat(
        "toy", _open_toy, extensions=(".toy",), positions=_toy_positions,
        calibration=lambda path, data: {"energy_kev": _toy_header(path)[1]},
        storage=lambda source: {"header_bytes": TOY_HEADER}))
    yield fmt
    del READERS["toy"], EXTENSIONS[".toy"]


def test_a_format_registered_from_outside_is_recognised_read_described_and_calibrates_a_run(tmp_path, toy_format):
    """The registry is the one place formats are dispatched: a format registered by this test,
    without a change to any ptyflow module, is told by its extension under data.format: auto,
    read, described, fills the beam energy of a run's config and gives its positions, so its
    preprocessed data equal those of the same patterns in HDF5."""
    from ptycho_core.config import DataParams
    from ptycho_core.io.calibration import config_for_run
    from ptycho_core.io.readers import EXTENSIONS, data_format, describe_data, file_calibration, open_patterns

    patterns, positions = synthetic()
    header = f"TOY1 {SCAN[0]} {SCAN[1]} {DET} 200".encode().ljust(TOY_HEADER)
    (tmp_path / "d.toy").write_bytes(header + patterns.astype("<u2").tobytes() + positions.astype("<f8").tobytes())
    raw = base_config(tmp_path / "d.toy")
    del raw["experiment"]["energy_kev"]  # stated by the file
    data = DataParams(path=str(tmp_path / "d.toy"))
    assert ".toy" in EXTENSIONS and data.format == "auto" and data_format(data) == "toy"

    source = open_patterns(data)
    try:
        assert source.scan_shape == SCAN and np.array_equal(source.read(np.arange(3, 9)),
                                                             patterns.reshape(-1, DET, DET)[3:9])
    finally:
        source.close()
    report = describe_data(data)
    assert report["format"] == "toy" and report["shape"] == [*SCAN, DET, DET] and report["dtype"] == "uint16"
    assert report["header_bytes"] == TOY_HEADER and report["calibration"] == {"energy_kev": 200.0}
    assert file_calibration(data) == {"energy_kev": 200.0}

    run_config = config_for_run(raw, tmp_path)
    assert run_config.experiment.energy_kev == 200.0
    with h5py.File(tmp_path / "d4.h5", "w") as f:
        f["patterns"], f["pos"] = patterns, positions
    toy, plain = preprocess(run_config), preprocess(cfg(base_config(tmp_path / "d4.h5", meas_key="/patterns",
                                                                    pos_key="/pos"), **{"experiment.energy_kev": 200}))
    assert np.array_equal(toy.measurements.load(), plain.measurements.load())
    assert np.array_equal(toy.positions_ang, plain.positions_ang) and toy.dx_ang == plain.dx_ang


def test_formats_are_registered_once_each_and_auto_names_its_own(toy_format):
    from ptycho_core.io.formats import DataFormat, register_format

    with pytest.raises(ValueError, match="data format 'toy' is registered already"):
        register_format(DataFormat("toy", _open_toy))
    with pytest.raises(ValueError, match=r"extensions \['.h5'\] already tell \['hdf5'\]"):
        register_format(DataFormat("toy2", _open_toy, extensions=(".h5",)))
    with pytest.raises(ValueError, match="data format 'auto' is data.format's word"):
        register_format(DataFormat("auto", _open_toy))


def test_preprocessing_steps(tmp_path):
    patterns, positions = synthetic(1)
    raw = write_all_formats(tmp_path, patterns, positions)["hdf5_4d"]
    base = preprocess(cfg(raw)).measurements.load()

    binned = preprocess(cfg(raw, **{"preprocess.bin": 2})).measurements.load()
    assert binned.shape == (20, 16, 16) and np.allclose(binned, base.reshape(20, 16, 2, 16, 2).sum((2, 4)))

    oriented = preprocess(cfg(raw, **{"preprocess.transpose": True, "preprocess.flip_x": True})).measurements.load()
    assert np.array_equal(oriented, base.transpose(0, 2, 1)[:, :, ::-1])

    cropped = preprocess(cfg(raw, **{"preprocess.target_size_px": 24})).measurements.load()
    assert np.array_equal(cropped, base[:, 4:28, 4:28])
    padded = preprocess(cfg(raw, **{"preprocess.target_size_px": 40, "experiment.dx_ang": 0.3})).measurements.load()
    assert np.array_equal(padded[:, 4:36, 4:36], base) and padded.sum() == base.sum()

    sub = preprocess(cfg(raw, **{"preprocess.scan_crop": [1, 4, 0, 5], "preprocess.scan_step": 2}))
    keep = [5, 7, 9, 15, 17, 19]  # rows 1 and 3, columns 0, 2, 4
    assert np.array_equal(sub.measurements.load(), base[keep])
    assert np.allclose(sub.positions_ang, positions[keep])

    fixed = preprocess(cfg(raw, **{"preprocess.bad_pixels": [[16, 16]], "preprocess.background": 1.0}))
    neighbours = [base[:, 16 + dy, 16 + dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]
    expected = np.maximum(np.mean(neighbours, axis=0) - 1.0, 0)
    fixed = fixed.measurements.load()
    assert np.allclose(fixed[:, 16, 16], expected, rtol=1e-6)
    assert fixed.min() >= 0 and np.allclose(fixed[:, 0, 0], np.maximum(base[:, 0, 0] - 1, 0))

    norm = preprocess(cfg(raw, **{"preprocess.normalize": "mean_sum"})).measurements.load()
    assert math.isclose(norm.sum((1, 2)).mean(), 1.0, rel_tol=1e-5)


def test_centring_and_dk_from_the_bright_field_disk(tmp_path):
    patterns, positions = synthetic(2)
    shifted = np.roll(patterns, (3, -2), axis=(2, 3))
    with h5py.File(tmp_path / "off.h5", "w") as f:
        f["meas"] = shifted
        f["pos"] = positions
    raw = base_config(tmp_path / "off.h5", pos_key="/pos")
    raw["experiment"].pop("dx_ang")
    prep = preprocess(cfg(raw, **{"preprocess.center_bf_disk": True, "preprocess.dk_from_bf_disk": True}))
    assert prep.notes["bf_disk_shift_px"] == [-3, 2]
    radius, centre = bf_disk(prep.measurements.load().mean(0))
    assert np.allclose(centre, [16, 16], atol=0.1)
    # the disk has a radius of 8 px and the config says 20 mrad: 2.5 mrad per pixel
    assert abs(prep.dk_mrad - 2.5) / 2.5 < 0.03 and prep.notes["dk_mrad_measured"] == prep.dk_mrad
    assert math.isclose(prep.dx_ang, wavelength_ang(300) / (DET * prep.dk_mrad * 1e-3))


# --------------------------------------------------------------------------- bad input
def bad_inputs(tmp_path):
    patterns, positions = synthetic(3)
    configs = write_all_formats(tmp_path, patterns, positions)
    good = configs["hdf5_4d"]
    nan = patterns.copy()
    nan[1, 2, 5, 5] = np.nan
    with h5py.File(tmp_path / "nan.h5", "w") as f:
        f["meas"] = nan
        f["pos"] = positions
        f["flat"] = patterns[0, 0]
    (tmp_path / "fake.h5").write_text("this is a text file, not HDF5\n")
    (tmp_path / "fake.npy").write_text("not numpy either\n")
    return [
        ("missing file", cfg(good, **{"data.path": str(tmp_path / "absent.h5")}), "absent.h5: data file not found"),
        ("key not found", cfg(good, **{"data.meas_key": "/nope"}),
         "no dataset '/nope'; datasets in the file: /entry/patterns, /entry/pos"),
        ("wrong ndim", cfg(good, **{"data.path": str(tmp_path / "nan.h5"), "data.meas_key": "/flat", "data.pos_key": "/pos"}),
         "nan.h5:/flat: has shape (32, 32); expected (N, ky, kx) or (scan_y, scan_x, ky, kx)"),
        ("NaN", cfg(good, **{"data.path": str(tmp_path / "nan.h5"), "data.meas_key": "/meas", "data.pos_key": "/pos"}),
         "nan.h5:/meas: pattern 7 contains NaN or Inf values"),
        ("positions count", cfg(configs["npy"], **{"preprocess.scan_step": 1, "data.pos_path": str(tmp_path / "short.npy")}),
         "short.npy:pos: holds 19 positions but the data hold 20 patterns"),
        ("detector size", cfg(good, **{"data.detector_shape": [64, 64]}),
         "patterns are 32x32 but data.detector_shape is [64, 64]"),
        ("disk outside", cfg(good, **{"experiment.dx_ang": 3.0}),
         "experiment.conv_angle_mrad 20.0 mrad at 0.2051 mrad/px puts the bright-field disk radius at 97.5 px, "
         "outside the 32x32 patterns"),
        ("not HDF5", cfg(good, **{"data.path": str(tmp_path / "fake.h5")}), "fake.h5: not an HDF5 file"),
        ("not npy", cfg(configs["npy"], **{"data.path": str(tmp_path / "fake.npy")}), "fake.npy: not a .npy file"),
        ("unknown extension", cfg(good, **{"data.path": str(tmp_path / "pos.txt")}),
         "cannot tell the format from the extension '.txt'; set data.format"),
    ], positions


def test_bad_input_is_one_clear_message_and_touches_nothing(tmp_path):
    cases, positions = bad_inputs(tmp_path)
    np.save(tmp_path / "short.npy", positions[:-1])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("kept")
    for label, config, message in cases:
        with pytest.raises(DataError) as info:
            prepare(config, run_dir)
        assert message in str(info.value), (label, str(info.value))
        assert sorted(p.name for p in run_dir.iterdir()) == ["notes.txt"], label


def test_bad_data_through_the_cli_is_one_line(tmp_path, run_cli):
    patterns, positions = synthetic(4)
    patterns[0, 0, 0, 0] = np.inf
    with h5py.File(tmp_path / "inf.h5", "w") as f:
        f["meas"] = patterns
        f["pos"] = positions
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(base_config(tmp_path / "inf.h5", pos_key="/pos")))
    result = run_cli("run", tmp_path / "c.yaml", "--run-dir", tmp_path / "run")
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {tmp_path / 'inf.h5'}:/meas: pattern 0 contains NaN or Inf values"
    assert not (tmp_path / "run" / "config.yaml").exists()


@pytest.mark.parametrize("layout", ["hdf5", "mat_v73", "tiff_zlib", "tiff_4d_zlib", "tiff_planes_zlib"])
def test_preprocessing_holds_a_few_blocks_not_the_dataset(tmp_path, layout):
    """Two streaming passes (centring needs the mean pattern) into preprocessed.h5: numpy's
    allocations peak at a few read blocks, a small part of the 38 MB of patterns. Compressed
    TIFFs are decoded a page at a time, whether a page holds a pattern of a 3D or a 4D stack or a
    scan row of patterns (as sample planes); they used to be decoded whole unless they were a 3D
    stack of one pattern per page."""
    import tracemalloc

    rng = np.random.default_rng(5)
    scan, det = (24, 24), 128
    yy, xx = np.mgrid[:det, :det] - det // 2
    disk = ((yy**2 + xx**2) <= 30**2).astype(np.float32) * 50
    name = {"hdf5": "big.h5", "mat_v73": "big.mat"}.get(layout, "big.tif")
    # MATLAB 7.3 stores the axes reversed: (kx, ky, scan_x, scan_y)
    shape, chunks = ((*scan, det, det), (1, scan[1], det, det)) if layout == "hdf5" else \
        ((det, det, scan[1], scan[0]), (det, det, scan[1], 1))
    if layout.startswith("tiff"):
        import tifffile

        stack = disk + rng.random((*scan, det, det), dtype=np.float32)
        if layout == "tiff_zlib":  # one compressed page per pattern, a 3D stack
            tifffile.imwrite(tmp_path / name, stack.reshape(-1, det, det), compression="zlib")
        elif layout == "tiff_4d_zlib":  # one compressed page per pattern, the series (scan_y, scan_x, ky, kx)
            tifffile.imwrite(tmp_path / name, stack, compression="zlib")
        else:  # one compressed page per scan row of 24 patterns (1.5 MB), as sample planes
            tifffile.imwrite(tmp_path / name, stack, compression="zlib", photometric="minisblack",
                             planarconfig="separate")
        del stack
    else:
        with h5py.File(tmp_path / name, "w", userblock_size=512) as f:
            ds = f.create_dataset("meas", shape=shape, dtype=np.float32, chunks=chunks)
            for row in range(scan[0]):
                block = disk + rng.random((scan[1], det, det), dtype=np.float32)
                if layout == "hdf5":
                    ds[row] = block
                else:
                    ds[..., row] = block.transpose()
    if layout == "mat_v73":
        with open(tmp_path / name, "r+b") as fh:
            fh.write(b"MATLAB 7.3 MAT-file, written by a test")
    raw = base_config(tmp_path / name)
    raw["experiment"]["scan"] = {"shape": list(scan), "step_ang": 0.5}
    config = cfg(raw, **{"preprocess.background": 0.5, "preprocess.center_bf_disk": True})
    block_bytes = 2 << 20
    tracemalloc.start()
    prep = preprocess(config, tmp_path / "preprocessed.h5", block_bytes=block_bytes)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert prep.measurements.nbytes == 24 * 24 * det * det * 4
    assert peak < 8 * block_bytes < 0.5 * prep.measurements.nbytes, peak / block_bytes
    assert np.allclose(prep.measurements.mean_pattern(), prep.mean_pattern)


@pytest.mark.parametrize("per_page", [1, 5, 20])
def test_compressed_tiff_blocks_give_the_stack_a_page_decoded_once(tmp_path, per_page):
    """20 patterns in pages of 1, of 5 (sample planes: the series is (4, 5, ky, kx)) or all 20 in
    one page: blocks of the first axis, also ones that start or end inside a page, are the
    patterns written, and blocks read in order decode every page once."""
    import tifffile

    from ptycho_core.io.readers import describe_data, open_patterns

    patterns, _ = synthetic(2)
    flat = patterns.reshape(-1, DET, DET).astype(np.uint16)  # detector counts
    if per_page == 1:
        tifffile.imwrite(tmp_path / "s.tif", flat, compression="zlib")
    else:
        tifffile.imwrite(tmp_path / "s.tif", flat.reshape(-1, per_page, DET, DET), compression="zlib",
                         photometric="minisblack", planarconfig="separate")
    data = cfg(base_config(tmp_path / "s.tif")).data
    assert describe_data(data)["dtype"] == "uint16"
    source = open_patterns(data)
    try:
        pages = source.array
        decoded = []
        decode = pages.tif.asarray
        pages.tif.asarray = lambda key, series: decoded.append(key) or decode(key=key, series=series)
        stack = flat.reshape(source.shape)
        ends = [0, 1, 3, 3, source.shape[0]]
        for lo, hi in zip(ends, ends[1:]):
            assert np.array_equal(pages[lo:hi], stack[lo:hi]), (lo, hi)
        assert decoded == list(range(20 // per_page))
        assert np.array_equal(source.read(np.array([2, 9, 19])), flat[[2, 9, 19]])
    finally:
        source.close()


def test_matlab_v5_is_described_without_reading_and_refused_when_it_cannot_fit(tmp_path):
    """scipy reads a v5 variable whole (it may be compressed): inspect-data takes shape and type
    from the variable's header, and a variable larger than half the memory available is refused,
    naming its size and the v7.3 alternative, before anything is allocated."""
    import struct
    import tracemalloc

    import scipy.io

    from ptycho_core.io.readers import describe_data, open_patterns

    big = np.random.default_rng(3).poisson(5.0, size=(8000, DET, DET)).astype(np.float32)  # 33 MB
    scipy.io.savemat(tmp_path / "big.mat", {"dp": big}, do_compression=True)
    data = cfg(base_config(tmp_path / "big.mat", meas_key="dp")).data
    tracemalloc.start()
    report = describe_data(data)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert report["shape"] == [8000, DET, DET] and report["dtype"] == "float32"
    assert peak < 0.1 * big.nbytes, peak

    # a file whose header declares 2^18 x 2^6 patterns of 64 x 64 doubles (550 GB): only the header is read
    scipy.io.savemat(tmp_path / "huge.mat", {"dp": np.ones((2, 3, 4, 5), np.uint8)})
    raw = bytearray((tmp_path / "huge.mat").read_bytes())
    # after the 128-byte file header and the variable's tag: its array flags (class 9, uint8) and dimensions
    assert struct.unpack_from("<2i2I2i4i", raw, 136) == (6, 8, 9, 0, 5, 16, 2, 3, 4, 5)
    struct.pack_into("<I", raw, 144, 6)  # class double
    struct.pack_into("<4i", raw, 160, 1 << 18, 1 << 6, 64, 64)
    (tmp_path / "huge.mat").write_bytes(bytes(raw))
    huge = cfg(base_config(tmp_path / "huge.mat", meas_key="dp"))
    assert describe_data(huge.data)["shape"] == [1 << 18, 1 << 6, 64, 64]
    source = open_patterns(huge.data)
    with pytest.raises(DataError, match=rf"^{tmp_path / 'huge.mat'}: variable 'dp' \(262144, 64, 64, 64\) float64 "
                                        r"is 550 GB; a MATLAB v5 file is read whole, .* Save it as MATLAB v7.3"):
        source.read(np.arange(4))  # the first block preprocessing reads
