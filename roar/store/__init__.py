"""The chunked array store: per-image float arrays of a dataset split, written resumably and
surviving SIGKILL, read by rows or by chunks.

One HDF5 file per split holds several named array sets ("methods": an attribution method's maps,
a VoG snapshot's input gradients), each with the identity its writer gave it. The modules:

* ``format``: encoding (float16 with a per-image scale), chunk size, header layout and versions;
* ``identity``: the checks that keep arrays of different inputs out of one store;
* ``staging``: the folder of finished chunks that makes writing crash-safe;
* ``hdf5``: the consolidated file;
* ``writer`` (``StoreWriter``), ``reader`` (``MapStore``), ``describe`` (``roar inspect``).
"""

from roar.store.describe import describe
from roar.store.format import CHUNK_BYTES, FORMAT, FORMAT_VERSION, chunk_rows_for, dequantize, quantize, staging_path
from roar.store.reader import MapStore
from roar.store.writer import StoreWriter

__all__ = [
    "CHUNK_BYTES",
    "FORMAT",
    "FORMAT_VERSION",
    "MapStore",
    "StoreWriter",
    "chunk_rows_for",
    "dequantize",
    "describe",
    "quantize",
    "staging_path",
]
