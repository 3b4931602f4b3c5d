"""Row-range reads and writes of ``.npy`` files with plain file I/O.

A memory map would do the same with less code, but every page it touches stays resident (and
counts in the process's memory) until the map is closed, so a pass over a file larger than RAM
through one map grows to the size of the file. These helpers read and write a range of rows at
a time, so a pass holds one chunk, whatever the file's size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


class NpyRows:
    """The rows of a C-ordered ``.npy`` file of shape ``(N, *row_shape)``, read on demand."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        mapped = np.load(self.path, mmap_mode="r", allow_pickle=False)  # header only
        if mapped.ndim == 0 or (mapped.ndim > 1 and not mapped.flags.c_contiguous):
            raise ValueError(f"{self.path}: needs a C-ordered array with a leading row axis")
        self.shape: tuple[int, ...] = tuple(mapped.shape)
        self.dtype: np.dtype = mapped.dtype
        self.offset: int = int(mapped.offset)
        del mapped
        self.row_items = int(np.prod(self.shape[1:], dtype=np.int64))

    def __len__(self) -> int:
        return self.shape[0]

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start..stop`` (clipped to the file) as an array ``(rows, *row_shape)``."""
        start, stop = max(0, start), min(stop, len(self))
        count = max(0, stop - start) * self.row_items
        at = self.offset + start * self.row_items * self.dtype.itemsize
        with self.path.open("rb") as handle:
            handle.seek(at)
            flat = np.fromfile(handle, self.dtype, count)
        if len(flat) != count:
            raise ValueError(f"{self.path}: truncated; rows {start}..{stop} are not all there")
        return flat.reshape(-1, *self.shape[1:])

    def chunks(self, rows: int):
        """``(start, block)`` over the whole file, ``rows`` rows at a time."""
        for start in range(0, len(self), rows):
            yield start, self.read(start, start + rows)


class NpyWriter:
    """Writes a ``.npy`` file of a known shape and dtype block by block, in row order."""

    def __init__(self, path: str | Path, dtype: np.dtype | type, shape: tuple[int, ...]):
        self.path = Path(path)
        self.dtype = np.dtype(dtype)
        self.shape = tuple(int(s) for s in shape)
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False}
        header["shape"] = self.shape
        self._handle = self.path.open("wb")
        np.lib.format.write_array_header_2_0(self._handle, header)
        self._rows = 0

    def write(self, block: np.ndarray) -> None:
        """Append rows ``block (rows, *row_shape)``, converted to the file's dtype."""
        block = np.ascontiguousarray(block, dtype=self.dtype)
        if block.shape[1:] != self.shape[1:] or self._rows + len(block) > self.shape[0]:
            raise ValueError(f"{self.path}: block {block.shape} does not fit {self.shape}")
        self._handle.write(block.tobytes())
        self._rows += len(block)

    def close(self) -> None:
        """Close the file; it must hold exactly the rows its shape announced."""
        self._handle.close()
        if self._rows != self.shape[0]:
            raise ValueError(f"{self.path}: {self._rows} rows written of {self.shape[0]}")

    def __enter__(self) -> NpyWriter:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            self.close()
        else:
            self._handle.close()
