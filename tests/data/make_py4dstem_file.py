"""Writes tests/data/py4dstem_datacube.h5 with py4DSTEM itself (not part of the test run).

The file is committed so that the tests read a layout written by the format's own tool without
installing py4DSTEM (numba, scikit-image, ...). Made with py4DSTEM 0.14.18:

    python3 -m venv /tmp/p4 && /tmp/p4/bin/pip install py4DSTEM==0.14.18
    /tmp/p4/bin/python tests/data/make_py4dstem_file.py

tests/test_detector_formats.py rebuilds the same patterns with ``py4dstem_patterns()``.
"""

from pathlib import Path

import numpy as np
import py4DSTEM

SCAN, DET = (3, 4), 16
patterns = (np.arange(SCAN[0] * SCAN[1] * DET * DET, dtype=np.uint32) % 97).astype(np.uint16)
datacube = py4DSTEM.DataCube(data=patterns.reshape(*SCAN, DET, DET))
datacube.calibration.set_R_pixel_size(0.5)
datacube.calibration.set_R_pixel_units("A")
datacube.calibration.set_Q_pixel_size(0.025)
datacube.calibration.set_Q_pixel_units("A^-1")
datacube.calibration.set_QR_rotation_degrees(12.5)
py4DSTEM.save(str(Path(__file__).with_name("py4dstem_datacube.h5")), datacube, mode="o")
