"""The data contract: one modality dataset is one folder.

A dataset folder holds::

    dataset.json   {"name", "modality", "kind": "fixed" | "sequence", "sample_shape", "classes"}
    manifest.csv   one row per sample: id, label, split, file, offset, length
    *.npy          the arrays the manifest points into (float32, no pickles)
    labelled.csv   optional, student side: the ids of train samples whose labels may be used

The manifest may carry a ``pair`` column (paired data): a student row's ``pair`` names the id of
its teacher-modality sample.

A sample is the rows ``offset .. offset + length`` of the ``.npy`` file named in ``file``
(relative to the folder). For ``kind == "fixed"`` (images, vectors) ``length`` is 1 and the array
has shape ``(rows, *sample_shape)``; for ``kind == "sequence"`` (audio frames, token vectors)
the array has shape ``(total_frames, *sample_shape)`` and a sample spans ``length`` frames.
Labels are class names (strings); ``split`` is one of ``train``, ``val``, ``test``.

``classes`` in ``dataset.json`` is ordered: class ``i`` is row ``i`` of a teacher head and
column ``i`` of a student's logits. The importers write it in :func:`class_order` (the natural
order of the names); a folder written by hand may use any order.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

SPLITS = ("train", "val", "test")
MANIFEST = "manifest.csv"
META = "dataset.json"
LABELLED = "labelled.csv"
MANIFEST_COLUMNS = ("id", "label", "split", "file", "offset", "length")
_UMASK = os.umask(0o022)
os.umask(_UMASK)
_DIGITS = re.compile(r"([0-9]+)")


def _natural_key(name: str, fold: bool) -> tuple:
    """``name`` cut into text and digit runs; digit runs compare as numbers (``"2" < "10"``),
    text runs as text, case-folded when ``fold``; a digit run sorts before a text run."""
    parts = _DIGITS.split(name)  # text, digits, text, ...: digit runs at the odd positions
    return tuple(
        (0, int(part), "" if fold else part) if i % 2 else (1, 0, part.casefold() if fold else part)
        for i, part in enumerate(parts)
        if part
    )


_FLOAT_INTEGER = re.compile(r"^([+-]?[0-9]+)\.0*$")


def integer_written_as_float(name: str) -> str | None:
    """The integer spelling of a class name written as a whole float (``"3.0"`` -> ``"3"``,
    ``"-2.00"`` -> ``"-2"``), or ``None`` for any other name. pandas writes an integer column
    that holds a missing value as floats, so ``0 .. 9`` can arrive as ``0.0 .. 9.0``."""
    match = _FLOAT_INTEGER.match(name)
    return match.group(1) if match else None


def spelling_key(name: str) -> str:
    """``name`` without surrounding whitespace and with a whole float written as an integer:
    two class names with one key differ only in how they are spelled."""
    stripped = name.strip()
    return integer_written_as_float(stripped) or stripped


def class_order(names: Iterable[str]) -> tuple[str, ...]:
    """The distinct ``names`` in natural order: numbers inside names compared as numbers
    (``"2"`` before ``"10"``, ``"c9"`` before ``"c10"``), text alphabetically ignoring case,
    then case (``"Bag" < "bag"``) and leading zeros (``"01" < "1"``) as tie breaks.

    The order of a dataset's ``classes`` written by the importers, hence of the teacher head's
    rows and the student's logits; ``"0" .. "9"`` keeps its order.
    """
    return tuple(sorted(set(names), key=lambda n: (_natural_key(n, True), _natural_key(n, False))))


@dataclass(frozen=True)
class DatasetMeta:
    """What ``dataset.json`` says about a dataset folder."""

    name: str
    modality: str
    kind: Literal["fixed", "sequence"]
    sample_shape: tuple[int, ...]
    classes: tuple[str, ...]
    source: str = ""
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "modality": self.modality,
            "kind": self.kind,
            "sample_shape": list(self.sample_shape),
            "classes": list(self.classes),
            "source": self.source,
            "extra": self.extra,
        }

    @classmethod
    def from_json(cls, raw: dict, where: str) -> DatasetMeta:
        try:
            kind = raw["kind"]
            if kind not in ("fixed", "sequence"):
                raise ValueError(f"kind must be 'fixed' or 'sequence', got {kind!r}")
            classes = tuple(str(c) for c in raw["classes"])
            if len(classes) < 2 or len(set(classes)) != len(classes):
                raise ValueError(f"classes must be at least 2 distinct names, got {classes}")
            return cls(
                name=str(raw["name"]),
                modality=str(raw["modality"]),
                kind=kind,
                sample_shape=tuple(int(s) for s in raw["sample_shape"]),
                classes=classes,
                source=str(raw.get("source", "")),
                extra=dict(raw.get("extra", {})),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise DataContractError([Problem(where, "-", "-", "dataset.json", str(exc))]) from None


@dataclass(frozen=True)
class Problem:
    """One violation of the contract: where it is and which check it failed."""

    file: str
    column: str
    row: str
    check: str
    detail: str

    def __str__(self) -> str:
        return (
            f"file={self.file} column={self.column} row={self.row} "
            f"check={self.check}: {self.detail}"
        )


class DataContractError(ValueError):
    """A dataset breaks the contract; ``problems`` lists every violation found. The message
    shows the first :data:`SHOWN` of them, how many more there are and, when ``report`` is
    given, the file that lists them all."""

    SHOWN = 20

    def __init__(self, problems: Sequence[Problem], report: str | None = None):
        self.problems = list(problems)
        self.report = report
        shown = "\n".join(f"  - {p}" for p in self.problems[: self.SHOWN])
        more = len(self.problems) - self.SHOWN
        tail = f"\n  ... and {more} more" if more > 0 else ""
        where = f"\n  every violation: {report}" if report else ""
        super().__init__(f"{len(self.problems)} data contract violation(s):\n{shown}{tail}{where}")


UNLABELLED_CLASSES = "unlabelled_classes"
"""The key of ``dataset.json``'s ``extra`` that names the classes without labelled samples."""


@dataclass
class ModalityDataset:
    """A dataset folder in memory: its metadata, manifest and (memory-mapped) arrays."""

    root: Path
    meta: DatasetMeta
    manifest: pd.DataFrame
    arrays: dict[str, np.ndarray]
    labelled_ids: frozenset[str] | None = None

    @property
    def class_index(self) -> dict[str, int]:
        return {c: i for i, c in enumerate(self.meta.classes)}

    @property
    def unlabelled_classes(self) -> tuple[str, ...]:
        """Classes declared to have no labelled sample (cmkd_core/data/unseen.py)."""
        return tuple(self.meta.extra.get(UNLABELLED_CLASSES, ()))

    def rows(self, split: str, labelled_only: bool = False) -> pd.DataFrame:
        """Manifest rows of one split; with ``labelled_only`` only ids in ``labelled.csv``."""
        rows = self.manifest[self.manifest["split"] == split]
        if labelled_only and self.labelled_ids is not None:
            rows = rows[rows["id"].isin(self.labelled_ids)]
        return rows

    def labels(self, rows: pd.DataFrame) -> np.ndarray:
        """Class indices of ``rows``, shape ``(n,)``, int64."""
        index = self.class_index
        return np.array([index[label] for label in rows["label"]], dtype=np.int64)

    def fixed_arrays(self, rows: pd.DataFrame) -> np.ndarray:
        """Samples of a fixed-size dataset, shape ``(n, *sample_shape)``, float32."""
        if self.meta.kind != "fixed":
            raise ValueError(f"{self.root}: dataset is {self.meta.kind}, not fixed")
        out = np.empty((len(rows), *self.meta.sample_shape), dtype=np.float32)
        for i, (file, offset) in enumerate(zip(rows["file"], rows["offset"], strict=True)):
            out[i] = self.arrays[file][offset]
        return out

    def each_sample(self, rows: pd.DataFrame) -> Iterator[np.ndarray]:
        """Each sample of ``rows`` as stored, unpadded (views of the arrays): ``(length,
        *sample_shape)`` for a sequence dataset, ``sample_shape`` for a fixed one."""
        for file, offset, length in zip(rows["file"], rows["offset"], rows["length"], strict=True):
            block = self.arrays[file][offset : offset + length]
            yield block if self.meta.kind == "sequence" else block[0]

    def sequence_frames(self, rows: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The frames of a sequence dataset's ``rows``, unpadded: ``frames (M, *sample_shape)``
        float32, and each row's ``starts`` and ``lengths`` ``(n,)`` int64 in it. When every row
        lies in one array file, ``frames`` is that (memory-mapped) array itself and nothing is
        copied; otherwise the rows' frames are copied into one array, row after row."""
        if self.meta.kind != "sequence":
            raise ValueError(f"{self.root}: dataset is {self.meta.kind}, not sequence")
        lengths = np.array(rows["length"], dtype=np.int64)
        files = rows["file"].unique()
        if len(files) == 1 and self.arrays[files[0]].dtype == np.float32:
            return self.arrays[files[0]], np.array(rows["offset"], dtype=np.int64), lengths
        frames = np.empty((int(lengths.sum()), *self.meta.sample_shape), dtype=np.float32)
        starts = np.cumsum(lengths) - lengths
        for start, block in zip(starts, self.each_sample(rows), strict=True):
            frames[start : start + len(block)] = block
        return frames, starts, lengths


def read_manifest(path: Path) -> pd.DataFrame:
    """Read ``manifest.csv`` with ids, labels, splits and files kept as strings."""
    return pd.read_csv(
        path,
        dtype={"id": str, "label": str, "split": str, "file": str, "pair": str},
        keep_default_na=False,
    )


def safe_member(root: Path, name: str) -> Path | None:
    """``root / name`` if ``name`` is a plain relative path that stays inside ``root``."""
    candidate = Path(name)
    if not name or candidate.is_absolute() or ".." in candidate.parts:
        return None
    return root / candidate


def _npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype, int] | None:
    """The shape, dtype and data offset (bytes) the header of the ``.npy`` at ``path``
    declares, or ``None`` when the header itself is unreadable (``np.load`` then says why)."""
    fmt = np.lib.format
    with open(path, "rb") as handle:
        try:
            version = fmt.read_magic(handle)
            if version == (1, 0):
                shape, _, dtype = fmt.read_array_header_1_0(handle)
            elif version == (2, 0):
                shape, _, dtype = fmt.read_array_header_2_0(handle)
            else:
                return None
        except (ValueError, EOFError):
            return None
        return tuple(int(s) for s in shape), dtype, handle.tell()


def npy_truncation(path: Path) -> str | None:
    """Why the ``.npy`` at ``path`` is shorter than its header says: the file, the bytes the
    header declares and the bytes present; ``None`` when it is complete (or has no readable
    header, or holds objects, for ``np.load`` to refuse)."""
    header = _npy_header(path)
    if header is None or header[1].hasobject:
        return None
    shape, dtype, offset = header
    declared = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    present = path.stat().st_size
    if present >= declared:
        return None
    return (
        f"{path} is truncated: its header declares shape {shape} {dtype}, {declared} bytes "
        f"({offset} of header and {declared - offset} of data), but the file has {present} "
        f"bytes ({declared - present} missing); write it again (np.save) or copy it whole"
    )


def load_npy(path: Path) -> np.ndarray:
    """Load a ``.npy`` file memory-mapped, refusing pickled object arrays and a truncated file
    (``ValueError`` naming the bytes declared and present)."""
    problem = npy_truncation(path)
    if problem is not None:
        raise ValueError(problem)
    return np.load(path, mmap_mode="r", allow_pickle=False)


def read_dataset(root: str | Path) -> ModalityDataset:
    """Read a dataset folder without validating it (see :func:`validate.check_dataset`)."""
    root = Path(root)
    meta_path = root / META
    try:
        meta = DatasetMeta.from_json(json.loads(meta_path.read_text()), str(meta_path))
    except (OSError, json.JSONDecodeError) as exc:
        raise DataContractError([Problem(str(meta_path), "-", "-", "readable", str(exc))]) from None
    manifest = read_manifest(root / MANIFEST)
    arrays = {}
    for name in sorted(set(manifest["file"])):
        path = safe_member(root, name)
        try:
            arrays[name] = load_npy(path)  # type: ignore[arg-type]
        except (TypeError, OSError, ValueError, EOFError):
            continue  # missing, escaping or corrupt: check_dataset reports it with its row
    labelled = None
    if (root / LABELLED).exists():
        labelled = frozenset(pd.read_csv(root / LABELLED, dtype={"id": str})["id"])
    return ModalityDataset(root, meta, manifest, arrays, labelled)


TEMPORARY = ".tmp"  # the suffix of atomic_path's temporary files


@contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it onto ``final`` only on success.

    A failure (or a kill) before the rename leaves whatever was at ``final`` untouched and no
    half-written file under the final name. An ``OSError`` without a file name (``write`` on a
    full disk gives none) is raised again with ``final`` in its message.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=TEMPORARY, dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_UMASK)
        os.replace(tmp_path, final)
    except OSError as exc:  # a full disk or a permission: say which output could not be written
        if exc.filename is not None:
            raise
        raise type(exc)(exc.errno, f"writing {final}: {exc.strerror or exc}") from exc
    finally:
        tmp_path.unlink(missing_ok=True)


def leftover_temporaries(final: str | Path) -> list[Path]:
    """The temporary files :func:`atomic_path` made for ``final`` and a kill left behind (the
    name part of ``final`` may be a glob pattern: ``folder/stage*.pt``)."""
    final = Path(final)
    return sorted(final.parent.glob(f".{final.name}.*{TEMPORARY}"))


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_dataset(
    root: str | Path,
    meta: DatasetMeta,
    manifest: pd.DataFrame,
    arrays: dict[str, np.ndarray],
    labelled_ids: Sequence[str] | None = None,
) -> Path:
    """Write a dataset folder; each file is written atomically.

    ``arrays`` maps file names (as used in the manifest's ``file`` column) to arrays of shape
    ``(rows, *meta.sample_shape)``.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        with atomic_path(root / name) as tmp, tmp.open("wb") as fh:
            np.save(fh, np.ascontiguousarray(array, dtype=np.float32), allow_pickle=False)
    with atomic_path(root / MANIFEST) as tmp:
        optional = ["pair"] if "pair" in manifest.columns else []
        manifest.loc[:, [*MANIFEST_COLUMNS, *optional]].to_csv(tmp, index=False)
    if labelled_ids is not None:
        with atomic_path(root / LABELLED) as tmp:
            pd.DataFrame({"id": list(labelled_ids)}).to_csv(tmp, index=False)
    write_text_atomic(root / META, json.dumps(meta.to_json(), indent=2) + "\n")
    return root
