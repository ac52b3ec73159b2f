"""An acquisition simulator: a finished dataset written again row by row, at a set frame rate, the
way a detector's writer writes it, for the live-mode tests and benchmarks/live.py.

Layouts (``LAYOUTS``):
- ``hdf5``: one 4D dataset (rows, columns, ky, kx) extended by a row at a time under SWMR (resize,
  write, flush), the planned positions written in full first;
- ``mib``: a Quantum Detectors Merlin .mib file that grows frame by frame (a 384-byte header, then
  the counts as big-endian uint32), with its .hdr naming the planned frame count;
- ``dectris``: a Dectris master file naming every data_NNNNNN.h5 file from the start, the data
  files appearing one by one (each written under a temporary name and renamed; or, with
  ``truncated_s``, each first left half-written under its own name for that long).

Runs in a thread (``Acquisition.start``) or, for SWMR, which HDF5 allows only between processes,
in a subprocess (``start_subprocess``, or ``python tests/acquisition.py ...``). It can stop after
``rows`` rows (fewer than planned) and then write the ``.done`` marker (``marker``) or fall silent
(a writer that stalls), and it can pause before a given row (``pause_before_row``, ``pause_s``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import h5py
import numpy as np
import yaml

LAYOUTS = ("hdf5", "mib", "dectris")
MIB_HEADER_BYTES = 384


def read_dataset(data_h5: str | Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """(patterns (rows, cols, ky, kx), positions_ang (N, 2), attrs) of a `ptyflow simulate` data.h5."""
    with h5py.File(data_h5, "r") as f:
        return f["meas"][()], f["positions_ang"][()], dict(f.attrs)


@dataclass
class Plan:
    """What to write and how fast: ``layout`` into ``out_dir``, ``frames_per_s``; ``rows``: stop
    after this many rows (None: all); ``marker``: write <file>.done at the end; ``frames_per_file``:
    Dectris data files; ``truncated_s``: leave each Dectris file half-written that long first."""

    layout: str
    out_dir: str
    frames_per_s: float = 200.0
    rows: Optional[int] = None
    marker: bool = False
    frames_per_file: int = 32
    truncated_s: float = 0.0
    pause_before_row: Optional[int] = None
    pause_s: float = 0.0
    name: str = "scan"
    meta: dict = field(default_factory=dict)  # energy_kev, step_ang for the files that state them
    truth_from: Optional[str] = None  # hdf5: copy this data.h5's ground_truth (and preset) into the file

    @property
    def data_path(self) -> Path:
        out = Path(self.out_dir)
        return {"hdf5": out / f"{self.name}.h5", "mib": out / f"{self.name}.mib",
                "dectris": out / f"{self.name}_master.h5"}[self.layout]


class Acquisition:
    """Writes ``patterns`` (rows, cols, ky, kx) as ``plan`` says; ``first_frame_at`` and
    ``last_frame_at`` are time.time() of the first and last frame written."""

    def __init__(self, patterns: np.ndarray, positions_ang: np.ndarray, plan: Plan):
        if plan.layout not in LAYOUTS:
            raise ValueError(f"layout {plan.layout!r}: one of {LAYOUTS}")
        self.patterns, self.positions_ang, self.plan = patterns, positions_ang, plan
        self.first_frame_at: Optional[float] = None
        self.last_frame_at: Optional[float] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        Path(plan.out_dir).mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ running
    def start(self) -> "Acquisition":
        self._thread = threading.Thread(target=self.run, daemon=True, name="acquisition")
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)

    def join(self, timeout: Optional[float] = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def run(self) -> None:
        rows = self.patterns.shape[0] if self.plan.rows is None else self.plan.rows
        writer = {"hdf5": self._hdf5, "mib": self._mib, "dectris": self._dectris}[self.plan.layout]
        writer(rows)
        if self.plan.marker and not self._stop.is_set():
            marker = self.plan.data_path.with_name(self.plan.data_path.name + ".done")
            marker.write_text("")

    def _frames_due(self, written: int, started: float) -> None:
        """Sleep until frame number ``written`` is due at the plan's frame rate."""
        due = started + written / self.plan.frames_per_s
        while not self._stop.is_set() and time.time() < due:
            time.sleep(min(0.01, due - time.time()))

    def _rows(self, rows: int):
        """(row index, its frames (cols, ky, kx)) as they are due; pauses as planned."""
        started = time.time()
        cols = self.patterns.shape[1]
        for row in range(rows):
            if row == self.plan.pause_before_row:
                self._stop.wait(self.plan.pause_s)
                started += self.plan.pause_s
            self._frames_due((row + 1) * cols, started)
            if self._stop.is_set():
                return
            yield row, self.patterns[row]
            self.first_frame_at = self.first_frame_at or time.time()
            self.last_frame_at = time.time()

    # ------------------------------------------------------------------ layouts
    def _hdf5(self, rows: int) -> None:
        path = self.plan.data_path
        n_rows, cols, ky, kx = self.patterns.shape
        with h5py.File(path, "w", libver="latest") as f:
            f.attrs.update(self.plan.meta)
            meas = f.create_dataset("meas", shape=(0, cols, ky, kx), maxshape=(n_rows, cols, ky, kx),
                                    chunks=(1, 1, ky, kx), dtype=np.float32)
            f.create_dataset("positions_ang", data=self.positions_ang)
            if self.plan.truth_from:
                with h5py.File(self.plan.truth_from, "r") as source:
                    source.copy("ground_truth", f)
                    f.attrs["preset"] = source.attrs["preset"]
            f.swmr_mode = True
            for row, frames in self._rows(rows):
                meas.resize(row + 1, axis=0)
                meas[row] = frames
                meas.flush()

    def _mib(self, rows: int) -> None:
        path = self.plan.data_path
        n_rows, cols = self.patterns.shape[:2]
        path.with_suffix(".hdr").write_text(
            "HDR,\t\nTime and Date Stamp (day, mnth, yr, hr, min, s):\t04/12/2026 12:00:00\n"
            f"Frames in Acquisition (Number):\t{n_rows * cols}\nFrames per Trigger (Number):\t{cols}\nEnd\t\n")
        with open(path, "wb") as fh:
            for row, frames in self._rows(rows):
                for col, frame in enumerate(frames):
                    fh.write(mib_frame(row * cols + col, frame))
                fh.flush()
                os.fsync(fh.fileno())

    def _dectris(self, rows: int) -> None:
        master = self.plan.data_path
        folder = master.parent
        n_rows, cols, ky, kx = self.patterns.shape
        per_file = self.plan.frames_per_file
        n_files = -(-n_rows * cols // per_file)
        stem = master.name.removesuffix("_master.h5")
        names = [f"{stem}_data_{i + 1:06d}.h5" for i in range(n_files)]
        with h5py.File(master.with_name(master.name + ".tmp"), "w") as f:
            for i, name in enumerate(names):
                f[f"entry/data/data_{i + 1:06d}"] = h5py.ExternalLink(name, "/entry/data/data")
            f.create_group("entry/instrument/detector")
            if "energy_kev" in self.plan.meta:
                from ptycho_core.physics import wavelength_ang

                f["entry/instrument/beam/incident_wavelength"] = wavelength_ang(float(self.plan.meta["energy_kev"]))
                f["entry/instrument/beam/incident_wavelength"].attrs["units"] = "angstrom"
        os.replace(master.with_name(master.name + ".tmp"), master)
        pending: list[np.ndarray] = []
        written_files = 0
        flat_total = rows * cols
        done = 0
        for row, frames in self._rows(rows):
            pending.extend(frames)
            done += cols
            while len(pending) >= per_file or (done == flat_total and pending):
                chunk, pending = np.asarray(pending[:per_file]), pending[per_file:]
                self._dectris_file(folder / names[written_files], chunk)
                written_files += 1
                if self._stop.is_set():
                    return

    def _dectris_file(self, path: Path, chunk: np.ndarray) -> None:
        tmp = path.with_name(path.name + ".tmp")
        with h5py.File(tmp, "w") as f:
            f.create_dataset("entry/data/data", data=np.round(chunk).astype(np.uint32), chunks=(1, *chunk.shape[1:]))
        if self.plan.truncated_s > 0:  # the file half there under its own name for a while
            data = tmp.read_bytes()
            path.write_bytes(data[: len(data) // 2])
            self._stop.wait(self.plan.truncated_s)
        os.replace(tmp, path)


def mib_frame(index: int, frame: np.ndarray) -> bytes:
    """One Merlin frame: a 384-byte ASCII header, then the counts as big-endian uint32, stored top
    to bottom so that RosettaSciIO (which shows frames turned over) reads back ``frame``."""
    fields = (["MQ1", f"{index + 1:06d}", f"{MIB_HEADER_BYTES:05d}", "01", f"{frame.shape[1]:04d}",
               f"{frame.shape[0]:04d}", "U32", "   1x1", "01", "2026-12-04 12:00:00.000000", "0.000100", "0", "0", "0"]
              + ["1.000000E+1"] + ["0.000000E+0"] * 7 + ["3RX"] + ["175", "511"] + ["000"] * 25
              + [f"2026-12-04T12:00:00.{index:09d}Z", "100000ns", "12", ""])  # thresholds, DACs, time stamps
    header = ",".join(fields).encode("ascii").ljust(MIB_HEADER_BYTES, b" ")
    return header + np.round(frame[::-1]).astype(">u4").tobytes()


def live_config(sim_config: str | Path, plan: Plan, **changes) -> dict:
    """The run config of the data ``plan`` writes, from a `ptyflow simulate` config: the same
    optics, slicing and iterations; the planned scan from experiment.scan where the file holds no
    positions. ``changes``: {group: {key: value}} merged in."""
    raw = yaml.safe_load(Path(sim_config).read_text())
    preset = yaml.safe_load(h5py.File(Path(sim_config).parent / raw["data"]["path"], "r").attrs["preset"])
    if plan.layout == "hdf5":
        raw["data"] = {"path": str(plan.data_path), "format": "hdf5", "meas_key": "/meas",
                       "pos_key": "/positions_ang", "pos_unit": "ang"}
    else:
        raw["data"] = {"path": str(plan.data_path), "format": "mib" if plan.layout == "mib" else "dectris"}
        raw["experiment"]["scan"] = {"shape": list(preset["scan_shape"]), "step_ang": float(preset["step_ang"])}
    for group, values in changes.items():
        raw.setdefault(group, {}).update(values)
    return raw


def start_subprocess(data_h5: str | Path, plan: Plan) -> subprocess.Popen:
    """This module's writer in a process of its own (SWMR needs writer and reader apart)."""
    return subprocess.Popen([sys.executable, __file__, str(data_h5), json.dumps(asdict(plan))],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def main() -> None:
    parser = argparse.ArgumentParser(description="write a simulated dataset row by row as a detector would")
    parser.add_argument("data_h5", help="a `ptyflow simulate` data.h5")
    parser.add_argument("plan", help="the Plan as JSON")
    args = parser.parse_args()
    patterns, positions, attrs = read_dataset(args.data_h5)
    plan = Plan(**json.loads(args.plan))
    acquisition = Acquisition(patterns, positions, plan)
    acquisition.run()
    print(json.dumps({"first_frame_at": acquisition.first_frame_at, "last_frame_at": acquisition.last_frame_at}),
          flush=True)


if __name__ == "__main__":
    main()
