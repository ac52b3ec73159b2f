"""An SrTiO3 dataset simulated by abTEM (independent multislice code), for the slow tests."""

import h5py
import numpy as np

LATTICE_ANG = 3.905
ENERGY_KEV = 300.0
CONV_MRAD = 25.0
DEFOCUS_ANG = 40.0
CELLS = 4  # 4x4 unit cells: a 15.62 Å periodic supercell


def simulate_srtio3(path, scan_end_cells=2.5, step_ang=0.6):
    """Write abTEM's patterns in its own layout (scan_x, scan_y, kx, ky) and keys; returns the
    true transmission phase (y, x) summed over slices and its sampling (Å)."""
    import abtem
    from ase import Atoms

    a = LATTICE_ANG
    cell = Atoms("SrTiO3", scaled_positions=[(0, 0, 0), (0.5, 0.5, 0.5), (0.5, 0.5, 0), (0.5, 0, 0.5), (0, 0.5, 0.5)],
                 cell=[a, a, a], pbc=True)
    potential = abtem.Potential(cell * (CELLS, CELLS, 1), sampling=0.05, slice_thickness=a / 2, projection="infinite")
    probe = abtem.Probe(energy=ENERGY_KEV * 1e3, semiangle_cutoff=CONV_MRAD, defocus=DEFOCUS_ANG)
    probe.grid.match(potential)
    scan = abtem.GridScan(start=(0, 0), end=(scan_end_cells * a, scan_end_cells * a), sampling=step_ang)
    patterns = probe.scan(potential, scan=scan, detectors=abtem.PixelatedDetector(max_angle=None)).compute()
    positions_xy = np.asarray(scan.get_positions()).reshape(-1, 2)
    transmission = potential.build().transmission_function(energy=ENERGY_KEV * 1e3).compute().array
    phase_yx = np.angle(transmission).sum(axis=0).T
    with h5py.File(path, "w") as f:
        f["abtem/diffraction"] = patterns.array.astype(np.float32)  # (scan_x, scan_y, kx, ky)
        f["abtem/diffraction"].attrs["dk_inv_ang"] = patterns.sampling[0]
        f["abtem/scan_yx_ang"] = positions_xy[:, ::-1]  # same flattened order as the patterns
    return phase_yx, potential.sampling[0], patterns.sampling[0]
