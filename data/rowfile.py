"""``RowFile``: a uint8 ``.npy`` array on disk, read and written a row at a time with
``pread`` / ``pwrite``.

Why not ``numpy.memmap``: every page of a memory map that a process touches counts in its
resident memory until the kernel reclaims it, so sampling tasks from a 16 GB memory-mapped
cache grows the training process towards 16 GB. Reads through the file leave the pages in
the kernel's page cache, shared and reclaimable, and not in the process. The file is a
standard ``.npy`` (``numpy.load`` reads it).
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np


class RowFile:
    """``[N, *row_shape]`` uint8 rows of the ``.npy`` file ``path``; indexing with an int, a
    slice or an int array reads them into memory; assigning an array to an int or a slice
    writes them."""
    dtype = np.dtype(np.uint8)

    def __init__(self, path: str, shape: Sequence[int] | None = None):
        """Opens ``path``; with ``shape``, creates it (its contents are undefined)."""
        self.path = path
        if shape is not None:
            with open(path, "wb") as f:
                np.lib.format.write_array_header_1_0(
                    f, {"descr": "|u1", "fortran_order": False, "shape": tuple(shape)})
                self.offset = f.tell()
                f.truncate(self.offset + int(np.prod(shape)))
            self.shape = tuple(int(d) for d in shape)
        else:
            with open(path, "rb") as f:
                version = np.lib.format.read_magic(f)
                read = (np.lib.format.read_array_header_1_0 if version == (1, 0) else
                        np.lib.format.read_array_header_2_0)
                shape, fortran, dtype = read(f)
                self.offset = f.tell()
            if dtype != np.uint8 or fortran:
                raise ValueError(f"{path} is not a C-ordered uint8 array")
            self.shape = tuple(shape)
        self.row_bytes = int(np.prod(self.shape[1:]))
        self._fd = os.open(path, os.O_RDWR if shape is not None else os.O_RDONLY)

    @classmethod
    def raw(cls, path: str, shape: Sequence[int]) -> "RowFile":
        """Reads a headerless file of ``shape`` rows (written with plain ``write`` calls)."""
        self = cls.__new__(cls)
        self.path, self.offset, self.shape = path, 0, tuple(int(d) for d in shape)
        self.row_bytes = int(np.prod(self.shape[1:]))
        self._fd = os.open(path, os.O_RDONLY)
        return self

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.row_bytes

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index) -> np.ndarray:
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                return self[np.arange(start, stop, step)]
            data = os.pread(self._fd, max(stop - start, 0) * self.row_bytes,
                            self.offset + start * self.row_bytes)
            return np.frombuffer(data, np.uint8).reshape((-1,) + self.shape[1:])
        if np.ndim(index) == 0:
            return self[int(index):int(index) + 1][0]
        rows = np.asarray(index, np.int64).reshape(-1)
        out = np.empty((len(rows),) + self.shape[1:], np.uint8)
        for i, r in enumerate(rows):
            out[i] = np.frombuffer(os.pread(self._fd, self.row_bytes,
                                            self.offset + int(r) * self.row_bytes),
                                   np.uint8).reshape(self.shape[1:])
        return out

    def __setitem__(self, index, value) -> None:
        start = (index.start or 0) if isinstance(index, slice) else int(index)
        data = np.ascontiguousarray(value, np.uint8).tobytes()
        os.pwrite(self._fd, data, self.offset + start * self.row_bytes)

    def flush(self) -> None:
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self):
        self.close()

    def __getstate__(self):
        raise TypeError("a RowFile holds an open file; pass its path instead")
