"""A starter config.yaml for a data file (``ptyflow init-config``): what the file states filled in,
every value the user must supply marked TODO with what it means and a typical value.

A TODO left in place fails the config check naming that field, so nothing runs on a guess."""

from __future__ import annotations

import json


def _value(value) -> str:
    return json.dumps(value)


def starter_config(report: dict, data_format: str = "auto", key: str | None = None) -> str:
    """YAML text for the file described by ``report`` (readers.describe_data)."""
    calibration = report.get("calibration", {})
    n = report["n_patterns"]
    lines = [
        f"# ptyflow configuration for {report['path']}",
        "# written by `ptyflow init-config`: values marked TODO must be supplied before `ptyflow run`.",
        "data:",
        f"  path: {_value(report['path'])}",
    ]
    lines.append(f"  format: {report['format']}" + ("  # recognised from the file" if data_format == "auto" else ""))
    if key or report["format"] == "hdf5":
        lines.append(f"  meas_key: {_value(key or report['key'])}  # the dataset of patterns")
    lines += ["experiment:"]
    if "energy_kev" in calibration:
        lines.append(f"  energy_kev: {calibration['energy_kev']:.6g}  # stated by the file")
    else:
        lines.append("  energy_kev: TODO  # beam energy (keV), e.g. 300")
    lines.append("  conv_angle_mrad: TODO  # probe semi-convergence angle (mrad), e.g. 25")
    lines.append("  defocus_ang: TODO  # defocus (Å): positive focuses that far below the entrance surface; e.g. 100")
    energy = calibration.get("energy_kev")
    if "dk_mrad" in calibration:
        lines.append(f"  dk_mrad: {calibration['dk_mrad']:.6g}  # stated by the file")
    elif "dk_inv_ang" in calibration and energy:
        from ..physics import dk_mrad_from_inverse_length

        dk_mrad = dk_mrad_from_inverse_length(calibration["dk_inv_ang"], energy)
        lines.append(f"  dk_mrad: {dk_mrad:.6g}  # the file's {calibration['dk_inv_ang']:.6g} 1/Å per pixel at its energy")
    elif "dk_inv_ang" in calibration:
        lines.append(f"  # dk_mrad: the file states {calibration['dk_inv_ang']:.6g} 1/Å per pixel; with energy_kev it is "
                     "filled in when the config is read")
    else:
        lines.append("  dk_mrad: TODO  # detector pixel size (mrad); or dx_ang, or preprocess.dk_from_bf_disk: true")
    scan = report.get("scan_shape")
    stated = calibration.get("scan", {})
    step = f"{stated['step_ang']:.6g}  # stated by the file" if "step_ang" in stated else "TODO  # scan step (Å), e.g. 0.4"
    rotation = (f"{stated['rotation_deg']:.6g}  # stated by the file" if "rotation_deg" in stated
                else "0.0  # scan rotation relative to the detector (deg)")
    lines += [
        "  scan:",
        f"    shape: {_value(scan) if scan else '[TODO, TODO]'}  # scan_y, scan_x: the file holds {n} patterns",
        f"    step_ang: {step}",
        f"    rotation_deg: {rotation}",
    ]
    if calibration.get("bad_pixels"):
        lines.append(f"# preprocess.bad_pixels: the file's pixel mask ({calibration['bad_pixels']} pixels) is applied "
                     "unless you set it")
    lines += [
        "recon_params:",
        "  iterations: 50  # passes over all patterns",
        "  batch_size: 32  # patterns per optimizer step",
    ]
    return "\n".join(lines) + "\n"
