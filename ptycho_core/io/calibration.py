"""A config for a run: the YAML, filled in with what its data file states, then validated.

``config.load_config`` reads and validates a config without opening any data file. A run starts
from ``load_run_config`` (a config file) or ``config_for_run`` (a raw dict, as the watched inbox
builds one per dataset): the calibration the data file states (readers.file_calibration: beam
energy, dk, the detector's bad pixels, the scan grid) fills what the config leaves out before
the config is validated, since ``experiment.energy_kev`` is required."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Optional

from ..config import PtyflowConfig, config_from_dict, read_config_file, resolve_paths
from ..physics import dk_mrad_from_inverse_length
from .readers import DataError, file_calibration

log = logging.getLogger("ptyflow")

CALIBRATION_TOLERANCE = 0.01  # a stated value this far from the file's is reported

Warn = Callable[[str], None]


def load_run_config(path: str | Path, warn: Optional[Warn] = None) -> PtyflowConfig:
    """The config file at ``path`` for a run: its data file's calibration fills what it leaves
    out, then it is validated and its relative paths are taken from its folder."""
    path = Path(path)
    return config_for_run(read_config_file(path), path.parent, source=str(path), warn=warn)


def config_for_run(raw: Any, base: Path, source: str = "config", warn: Optional[Warn] = None) -> PtyflowConfig:
    """``raw`` (a config as YAML reads it; relative paths from ``base``) filled in from its data
    file (fill_from_data_file), validated and with every path absolute. ``raw`` is not changed."""
    filled = fill_from_data_file(raw, base, warn or log.warning)
    return resolve_paths(config_from_dict(filled, source=source), base)


def fill_from_data_file(raw: Any, base: Path, warn: Warn) -> Any:
    """``raw`` with what its data file states filled in where the config says nothing (a copy
    when anything is filled). A value the config states wins; one that differs from the file's by
    more than 1 % is reported through ``warn``, naming both. Files that state nothing, or that
    cannot be read yet, leave ``raw`` as it is (reading the data reports a bad file)."""
    data = raw.get("data") if isinstance(raw, dict) else None
    if not isinstance(data, dict) or not isinstance(data.get("path"), str):
        return raw
    path = Path(data["path"]).expanduser()
    path = path if path.is_absolute() else base / path
    try:
        found = file_calibration(SimpleNamespace(path=str(path), format=data.get("format", "auto"),
                                                 meas_key=data.get("meas_key"), scan_shape=data.get("scan_shape")))
    except (DataError, OSError, KeyError, ValueError):
        return raw
    if not found or not isinstance(raw.get("experiment", {}), dict) or not isinstance(raw.get("preprocess", {}), dict):
        return raw
    raw = copy.deepcopy(raw)
    exp, pp = raw.setdefault("experiment", {}), raw.setdefault("preprocess", {})
    _fill_energy(exp, found, path.name, warn)
    if found.get("transposed"):
        # py4DSTEM's QR_flip: how a transpose composes with its rotation is not pinned down here,
        # so neither is applied silently
        found.get("scan", {}).pop("rotation_deg", None)
        warn(f"{path.name} states that its patterns are transposed relative to the scan (QR_flip); ptyflow does not "
             "apply that or the file's scan rotation: set preprocess.transpose and experiment.scan.rotation_deg")
    if "scan" in found and data.get("pos_key") is None:
        _fill_scan(exp, found["scan"], path.name, warn)
    _fill_dk(exp, pp, found, path.name, warn)
    if "scan_shape" in found and raw["data"].get("scan_shape") is None:
        raw["data"]["scan_shape"] = list(found["scan_shape"])
    if found.get("bad_pixels") and "bad_pixels" not in pp:
        pp["bad_pixels"] = [list(yx) for yx in found["bad_pixels"]]
    return raw


def _differs(stated, stated_by_file: float) -> bool:
    return isinstance(stated, (int, float)) and abs(stated - stated_by_file) > CALIBRATION_TOLERANCE * abs(stated_by_file)


def _fill_energy(exp: dict, found: dict, file_name: str, warn: Warn) -> None:
    if "energy_kev" not in found:
        return
    if exp.get("energy_kev") is None:
        exp["energy_kev"] = found["energy_kev"]
    elif _differs(exp["energy_kev"], found["energy_kev"]):
        warn(f"experiment.energy_kev: the config says {exp['energy_kev']:g} keV but {file_name} states "
             f"{found['energy_kev']:.6g} keV (from its wavelength); using the config's value")


def _fill_dk(exp: dict, pp: dict, found: dict, file_name: str, warn: Warn) -> None:
    """experiment.dk_mrad when nothing else calibrates the detector; an inverse length per pixel
    turns into mrad at the beam energy (the config's, or the file's filled in before)."""
    dk_mrad = found.get("dk_mrad")
    energy = exp.get("energy_kev")
    if "dk_inv_ang" in found and isinstance(energy, (int, float)) and energy > 0:
        dk_mrad = dk_mrad_from_inverse_length(found["dk_inv_ang"], energy)
    if dk_mrad is None:
        return
    if exp.get("dk_mrad") is None and exp.get("dx_ang") is None and not pp.get("dk_from_bf_disk"):
        exp["dk_mrad"] = dk_mrad
    elif exp.get("dk_mrad") is not None and _differs(exp["dk_mrad"], dk_mrad):
        warn(f"experiment.dk_mrad: the config says {exp['dk_mrad']:g} mrad/px but {file_name} states {dk_mrad:.6g} "
             "mrad/px (its detector calibration); using the config's value")


def _fill_scan(exp: dict, scan: dict, file_name: str, warn: Warn) -> None:
    """experiment.scan from the file's grid when the config states none; a stated one takes the
    file's rotation when it leaves that out."""
    stated = exp.get("scan")
    if stated is None:
        exp["scan"] = dict(scan)
        return
    if not isinstance(stated, dict):
        return
    if _differs(stated.get("step_ang"), scan["step_ang"]):
        warn(f"experiment.scan.step_ang: the config says {stated['step_ang']:g} Å but {file_name} states "
             f"{scan['step_ang']:.6g} Å; using the config's value")
    if "rotation_deg" in scan:
        file_rotation = scan["rotation_deg"]
        if stated.get("rotation_deg") is None:
            stated["rotation_deg"] = file_rotation
        elif isinstance(stated["rotation_deg"], (int, float)) \
                and abs(stated["rotation_deg"] - file_rotation) > max(0.1, CALIBRATION_TOLERANCE * abs(file_rotation)):
            warn(f"experiment.scan.rotation_deg: the config says {stated['rotation_deg']:g}° but {file_name} "
                 f"states {file_rotation:.6g}°; using the config's value")

