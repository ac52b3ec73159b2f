"""The data formats ptyflow reads, one module per format family, each registering its
``DataFormat`` (base.py) when imported here. Importing them in this order gives ``FORMATS`` its
order, which is also the order in which formats told by their content (dectris, emd, velox among
HDF5 files) are tried under data.format: auto.

A new format is a module here that calls ``register_format``, its import below, its name in
``config.DataParams.format`` and a test."""

from . import hdf5, npy, matlab, tiff, zarr_store, empad, dectris, merlin, emd, gatan, velox  # noqa: F401
from .base import EXTENSIONS, FORMATS, READERS, DataError, DataFormat, PatternSource, register_format

__all__ = ["EXTENSIONS", "FORMATS", "READERS", "DataError", "DataFormat", "PatternSource", "register_format"]
