"""Converters that write a contract dataset folder from the user's own arrays.

``import_arrays`` takes one array file and a labels table (CSV or parquet, one row per sample):

- ``.npy`` of shape ``(N, *sample_shape)``: fixed-size samples (images, vectors);
- ``.npy`` of shape ``(total_frames, F)`` plus a ``length`` column in the table: sequences
  stored back to back (audio frames, token vectors), sample ``i`` spanning ``length[i]`` frames;
- ``.npz`` with ``x`` ``(N, *sample_shape)``, or ``x`` ``(N, T, F)`` padded plus ``lengths``
  ``(N,)``: the same, for data that fit in memory.

The table needs ``label``; ``id``, ``split`` (train/val/test) and ``pair`` (the id of the paired
sample of the other modality) are optional. Labels are taken as written (``"03"`` and ``"3"``
are two classes); one with leading or trailing whitespace is refused, and so are integers
written as floats (every class like ``3.0``, or ``3.0`` beside ``3``), which a teacher's ``3``
would not match. The class list is the labels in :func:`~cmkd_core.data.contract.class_order`
(natural order), the order a teacher head's rows follow. Every class needs a sample in each
split; a gap is refused naming the table and its ``split`` (or ``label``) column. The samples
must be float32 (other dtypes are refused, never cast) and finite; every non-finite sample is
reported (the first ``validate.MAX_REPORTED`` by row, then a count). A truncated ``.npy``, an
``.npz`` without ``x`` and lengths that do not sum to the frames are refused with the bytes,
the first member names or the first offending row.

A ``.npy`` is read and copied in chunks of at most ``chunk`` samples and 16 MB, so the arrays
need not fit in memory (``bench/stream.py`` shows the peak staying flat for 10x the data). The
folder is written under a staging name, validated, then renamed: a failure leaves nothing
under ``out``.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from cmkd_core.data.contract import (
    DataContractError,
    DatasetMeta,
    class_order,
    npy_truncation,
    write_dataset,
)
from cmkd_core.data.defaults import labelled_subset, stratified_splits
from cmkd_core.data.npyio import NpyRows, NpyWriter
from cmkd_core.data.tables import (
    check_frames,
    fail,
    npz_without_x,
    read_table,
    split_problems,
    table_lengths,
)
from cmkd_core.data.validate import MAX_REPORTED, check_dataset, finite_problems
from cmkd_core.frontend import AudioError, AudioFrontEnd, ImageError, ImageFrontEnd, read_wav

SAMPLES = "samples.npy"
CHUNK_BYTES = 1 << 24


def _refuse_existing(out: Path) -> None:
    if out.exists():
        raise fail(out, "-", "-", "absent", "exists already; choose a new folder")


def _sources(arrays: Path, table: pd.DataFrame, labels: Path):
    """``(kind, sample_shape, lengths, reader)``; ``reader(i, j)`` returns rows ``i..j`` of the
    frames ``(j - i, F)`` (sequences) or samples ``(j - i, *sample_shape)`` (fixed), float32;
    any other dtype is refused."""
    if not arrays.is_file():
        raise fail(arrays, "-", "-", "exists", "no such file")
    try:
        if arrays.suffix == ".npz":
            with np.load(arrays, allow_pickle=False) as npz:
                if "x" not in npz.files:
                    raise npz_without_x(arrays, npz.files)
                x = npz["x"]
                lengths = npz["lengths"] if "lengths" in npz.files else None
            if lengths is not None:
                if lengths.shape != (len(x),) or x.ndim != 3:
                    raise fail(arrays, "lengths", "-", "shape", "needs x (N, T, F), lengths (N,)")
                bad = np.nonzero((lengths < 1) | (lengths > x.shape[1]))[0]
                if len(bad):
                    raise fail(arrays, "lengths", int(bad[0]), "range", f"1..{x.shape[1]}")
                x = np.concatenate([x[i, :n] for i, n in enumerate(lengths)])
        else:
            truncated = npy_truncation(arrays)
            if truncated is not None:
                raise fail(arrays, "-", "-", "readable", truncated)
            x = NpyRows(arrays)  # read a chunk at a time, never whole
            lengths = table_lengths(labels, table) if "length" in table.columns else None
    except DataContractError:
        raise
    except Exception as exc:  # truncated, corrupt or pickled arrays
        raise fail(arrays, "-", "-", "readable", f"not a readable array: {exc}") from None
    if x.dtype.kind != "f" or x.dtype.itemsize != 4:  # float32 of either byte order
        found = f"{x.dtype}" + ("" if x.dtype.kind in "fiub" else " (not numeric)")
        raise fail(
            arrays,
            "x" if arrays.suffix == ".npz" else "-",
            "-",
            "dtype",
            f"found {found}, expected float32; import never casts: convert with "
            "arr.astype(np.float32) (after checking the values survive it) and save again",
        )
    if lengths is None:
        if len(x) != len(table):
            raise fail(labels, "-", len(x), "rows", f"{len(table)} rows for {len(x)} samples")
        return "fixed", tuple(x.shape[1:]), None, _reader(x)
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) != len(table):
        detail = f"{len(table)} rows for {len(lengths)} samples"
        raise fail(labels, "-", len(lengths), "rows", detail)
    check_frames(labels, lengths, len(x))
    return "sequence", tuple(x.shape[1:]), lengths, _reader(x)


def _reader(x: np.ndarray | NpyRows):
    return x.read if isinstance(x, NpyRows) else lambda i, j: x[i:j]


def _copy_finite(
    read,
    target: Path,
    shape: tuple[int, ...],
    counts: np.ndarray,
    lengths: np.ndarray | None,
    chunk: int,
    source: Path,
) -> None:
    """Copy the rows that ``read(i, j)`` returns into the float32 ``.npy`` file ``target``, in
    blocks of at most 16 MB; raise :class:`DataContractError` naming the first non-finite
    samples of ``source`` (rows, or samples and frames when ``lengths`` are given)."""
    rows = int(counts.sum())
    step = chunk if lengths is None else chunk * max(1, int(np.median(lengths)))
    row_bytes = 4 * int(np.prod(shape, dtype=np.int64))
    step = max(1, min(step, CHUNK_BYTES // max(1, row_bytes)))  # a block of <= 16 MB
    ends = np.cumsum(counts)
    shown: list[str] = []  # the first MAX_REPORTED non-finite samples, as rows to print
    bad_samples, last = 0, -1
    with NpyWriter(target, np.float32, (rows, *shape)) as target:
        for start in range(0, rows, step):
            block = np.asarray(read(start, start + step), dtype=np.float32)
            bad = np.nonzero(~np.isfinite(block.reshape(len(block), -1)).all(1))[0]
            if len(bad):  # rows are samples, or frames of the samples ``sample``
                sample = np.searchsorted(ends, start + bad, "right")
                first = np.concatenate([[sample[0] != last], sample[1:] != sample[:-1]])
                room = MAX_REPORTED - len(shown)
                for row, i in zip(start + bad[first][:room], sample[first][:room], strict=True):
                    shown.append(str(row) if lengths is None else f"{i} (frame {row})")
                bad_samples += int(first.sum())
                last = int(sample[-1])
            target.write(block)
    if bad_samples:
        raise DataContractError(finite_problems(source, shown, bad_samples))


def import_arrays(
    arrays: str | Path,
    labels: str | Path,
    out: str | Path,
    *,
    name: str,
    modality: str,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    seed: int = 0,
    labelled_per_class: int | None = None,
    chunk: int = 4096,
    extra: dict | None = None,
    source: str | None = None,
) -> Path:
    """Write the contract dataset ``out`` from ``arrays`` and ``labels`` (module docstring).

    Without a ``split`` column the splits are stratified with the fractions and ``seed``;
    ``labelled_per_class`` writes ``labelled.csv`` (a student's labelled budget). Raises
    :class:`DataContractError` naming the file, column and row of the first problem.
    """
    arrays, labels, out = Path(arrays), Path(labels), Path(out)
    _refuse_existing(out)
    table = read_table(labels)
    kind, shape, lengths, read = _sources(arrays, table, labels)
    label_values = table["label"].to_numpy()
    classes = class_order(label_values)
    position = {c: i for i, c in enumerate(classes)}
    index = np.array([position[c] for c in label_values])
    if "split" in table.columns:
        splits = table["split"].to_numpy()
        bad = np.nonzero(~np.isin(splits, ["train", "val", "test"]))[0]
        if len(bad):
            raise fail(labels, "split", int(bad[0]), "isin", f"{splits[bad[0]]!r}")
    else:
        splits = stratified_splits(index, val_fraction, test_fraction, seed)
    coverage = split_problems(labels, label_values, np.asarray(splits), "split" in table.columns)
    if coverage:
        raise DataContractError(coverage)
    if "id" in table.columns:
        ids = table["id"]
        repeated = np.nonzero(ids.duplicated().to_numpy())[0]
        if len(repeated):
            raise fail(labels, "id", int(repeated[0]), "unique", f"{ids.iloc[repeated[0]]!r}")
    else:
        ids = [f"{name}-{i:06d}" for i in range(len(table))]
    counts = np.ones(len(table), np.int64) if lengths is None else lengths
    manifest = pd.DataFrame(
        {
            "id": ids,
            "label": label_values,
            "split": splits,
            "file": SAMPLES,
            "offset": np.concatenate([[0], np.cumsum(counts)[:-1]]),
            "length": counts,
        }
    )
    if "pair" in table.columns:
        manifest["pair"] = table["pair"].to_numpy()
    labelled = None
    if labelled_per_class is not None:
        mask = labelled_subset(index, np.asarray(splits), labelled_per_class, seed)
        labelled = list(manifest.loc[mask, "id"])
    origin = source or str(arrays)
    meta = DatasetMeta(name, modality, kind, shape, tuple(classes), origin, extra or {})
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        _copy_finite(read, staging / SAMPLES, shape, counts, lengths, chunk, arrays)
        write_dataset(staging, meta, manifest, {}, labelled)
        try:
            check_dataset(staging)
        except DataContractError as exc:  # name the folder the user asked for
            named = [replace(p, file=p.file.replace(str(staging), str(out))) for p in exc.problems]
            raise DataContractError(named) from None
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _import_staged(arrays: Path, staged: Path, users: Path, out: Path, **settings: object) -> Path:
    """:func:`import_arrays` of a front end's ``arrays`` and its ``staged`` copy of the user's
    table; a refusal names the user's table ``users`` instead of that copy."""
    try:
        return import_arrays(arrays, staged, out, **settings)
    except DataContractError as exc:
        raise _naming(exc, staged, users) from None


def _naming(exc: DataContractError, written: Path, users: Path) -> DataContractError:
    """``exc`` with the table a converter wrote (``written``) named as the user's ``users``,
    whose rows it keeps in order."""
    problems = [replace(p, file=str(users)) if p.file == str(written) else p for p in exc.problems]
    return DataContractError(problems, exc.report)


def _files_of(folder: Path, labels: Path, out: Path) -> tuple[pd.DataFrame, list[Path]]:
    """The labels table and the path of each row's ``file`` (all checked to exist) for the
    converters that read one file per sample."""
    _refuse_existing(out)
    table = read_table(labels)
    if "file" not in table.columns:
        raise fail(labels, "file", "-", "required", f"columns are {list(table.columns)}")
    paths = [folder / file for file in table["file"]]
    for row, path in enumerate(paths):
        if not path.is_file():
            raise fail(labels, "file", row, "exists", f"{path}: no such file")
    out.parent.mkdir(parents=True, exist_ok=True)
    return table, paths


def import_wav(
    folder: str | Path,
    labels: str | Path,
    out: str | Path,
    *,
    name: str,
    front_end: AudioFrontEnd,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    seed: int = 0,
    labelled_per_class: int | None = None,
) -> Path:
    """Run ``front_end`` over the WAV files of ``folder`` named in the ``file`` column of
    ``labels`` and write a sequence dataset ``out`` whose ``dataset.json`` records the front
    end. Clips are read one at a time and their frames appended to disk, so memory holds one
    clip; the frames file is then written as ``.npy`` in chunks."""
    folder, labels, out = Path(folder), Path(labels), Path(out)
    table, paths = _files_of(folder, labels, out)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.wav.", dir=out.parent))
    try:
        raw, lengths = staging / "frames.f32", []
        with raw.open("wb") as sink:
            for row, path in enumerate(paths):
                try:
                    frames = front_end(*read_wav(path))
                except AudioError as exc:
                    raise fail(path, "-", row, "wav", str(exc)) from None
                sink.write(frames.tobytes())
                lengths.append(len(frames))
        width = front_end.num_features
        total = sum(lengths)
        frames_npy = staging / "frames.npy"
        with NpyWriter(frames_npy, np.float32, (total, width)) as target, raw.open("rb") as src:
            for _start in range(0, total, 1 << 16):
                target.write(np.fromfile(src, np.float32, (1 << 16) * width).reshape(-1, width))
        raw.unlink()
        table = table.drop(columns="file").assign(length=lengths)
        table.to_csv(staging / "labels.csv", index=False)
        out = _import_staged(
            frames_npy,
            staging / "labels.csv",
            labels,
            out,
            modality="audio",
            source=f"{folder} (WAV, {front_end.features})",
            name=name,
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            seed=seed,
            labelled_per_class=labelled_per_class,
            extra={"front_end": front_end.to_json()},
        )
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def import_images(
    folder: str | Path,
    labels: str | Path,
    out: str | Path,
    *,
    name: str,
    front_end: ImageFrontEnd,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    seed: int = 0,
    labelled_per_class: int | None = None,
) -> Path:
    """Run ``front_end`` over the images of ``folder`` named in the ``file`` column of
    ``labels`` and write a fixed-size dataset ``out`` (samples ``(height, width)``) whose
    ``dataset.json`` records the front end. Images are read one at a time."""
    folder, labels, out = Path(folder), Path(labels), Path(out)
    table, paths = _files_of(folder, labels, out)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.img.", dir=out.parent))
    try:
        shape = (len(table), front_end.height, front_end.width)
        with NpyWriter(staging / "images.npy", np.float32, shape) as images:
            for row, path in enumerate(paths):
                try:
                    images.write(front_end(path)[None])
                except ImageError as exc:
                    raise fail(path, "-", row, "image", str(exc)) from None
        table.drop(columns="file").to_csv(staging / "labels.csv", index=False)
        out = _import_staged(
            staging / "images.npy",
            staging / "labels.csv",
            labels,
            out,
            modality="image",
            source=f"{folder} (images)",
            name=name,
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            seed=seed,
            labelled_per_class=labelled_per_class,
            extra={"front_end": front_end.to_json()},
        )
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out
