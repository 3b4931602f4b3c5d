"""The user's labels table and arrays, checked before an import writes anything.

Every refusal is a :class:`~cmkd_core.data.contract.DataContractError` naming the user's file,
its column and row, and what to do (the rules: :mod:`cmkd_core.data.importers`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from cmkd_core.data.contract import (
    SPLITS,
    DataContractError,
    Problem,
    class_order,
    integer_written_as_float,
)
from cmkd_core.data.validate import MAX_REPORTED

TEXT_COLUMNS = ("label", "id", "split", "pair")
SHOWN_NAMES = 5
"""Names (npz members, classes) shown in a message; the rest are counted."""


def fail(file: Path, column: str, row: object, check: str, detail: str) -> DataContractError:
    return DataContractError([Problem(str(file), column, str(row), check, detail)])


def some(names: list[str]) -> str:
    """The first :data:`SHOWN_NAMES` of ``names``, quoted, and how many there are in all."""
    shown = ", ".join(repr(n) for n in names[:SHOWN_NAMES])
    return shown + (f", ... ({len(names)} in all)" if len(names) > SHOWN_NAMES else "")


def read_table(path: Path) -> pd.DataFrame:
    """The labels table (``.csv`` or ``.parquet``) with string ids, labels and splits."""
    if not path.is_file():
        raise fail(path, "-", "-", "exists", "no such file")
    try:
        if path.suffix == ".parquet":
            table = pd.read_parquet(path)
        else:  # text columns as written: no "3 " -> 3 or "03" -> 3 by number parsing
            table = pd.read_csv(path, dtype=dict.fromkeys(TEXT_COLUMNS, str))
    except Exception as exc:  # pandas raises many types for unreadable files
        raise fail(path, "-", "-", "readable", str(exc)) from None
    if "label" not in table.columns:
        raise fail(path, "label", "-", "required", f"columns are {list(table.columns)}")
    for column in TEXT_COLUMNS:
        if column in table.columns:
            missing = table[column].isna().to_numpy().nonzero()[0]
            if len(missing):
                raise fail(path, column, int(missing[0]), "not_null", "empty value")
            table[column] = table[column].astype(str)
    padded = np.nonzero((table["label"] != table["label"].str.strip()).to_numpy())[0]
    if len(padded):
        raise DataContractError(
            [
                Problem(
                    str(path),
                    "label",
                    str(row),
                    "no_surrounding_whitespace",
                    f"{table['label'].iloc[row]!r} has leading or trailing whitespace",
                )
                for row in padded
            ]
        )
    _refuse_float_integers(path, table["label"])
    return table


def _refuse_float_integers(path: Path, labels: pd.Series) -> None:
    """Refuse labels that are integers written as floats (``3.0``): as text they are classes
    ``0.0 .. 9.0``, which a teacher's ``0 .. 9`` would not match. Refused when every class is
    such a float, or when one is also written as an integer (``3.0`` and ``3``)."""
    classes = class_order(labels)
    as_integer = {c: integer_written_as_float(c) for c in classes}
    floats = [c for c in classes if as_integer[c] is not None]
    clashes = [c for c in floats if as_integer[c] in classes]
    if not floats or (len(floats) < len(classes) and not clashes):
        return
    first = int(np.nonzero(labels.isin(clashes or floats).to_numpy())[0][0])
    if clashes:
        found = f"both {clashes[0]!r} and {as_integer[clashes[0]]!r} are labels"
    else:
        found = f"every class is a whole number written as a float: {some(floats)}"
    raise fail(
        path,
        "label",
        first,
        "integer_labels",
        f"{found}; labels are taken as text, so '3.0' would be a class of its own, unlike a "
        "teacher's '3'. Write the labels as integers (df['label'] = df['label'].astype(int), "
        "then to_csv) and import again",
    )


def npz_without_x(arrays: Path, members: list[str]) -> DataContractError:
    """The refusal of an ``.npz`` without ``x``: the layout expected and a few member names
    (an ``.npz`` of one member per sample can hold thousands)."""
    return fail(
        arrays,
        "x",
        "-",
        "required",
        f"no member 'x'; members are {some(members)}. Expected x (N, *sample_shape), one "
        "sample per table row, or x (N, T, F) zero-padded plus lengths (N,); one member per "
        "sample is not read: stack them into x (np.savez(path, x=np.stack(samples))), or save "
        "sequences back to back as a .npy with a 'length' column (docs/data.md)",
    )


def table_lengths(labels: Path, table: pd.DataFrame) -> np.ndarray:
    """The ``length`` column as int64; every value must be a whole number >= 1, else the
    rows that are not are named (the first :data:`MAX_REPORTED`, then a count)."""
    values = pd.to_numeric(table["length"], errors="coerce").to_numpy(dtype=np.float64)
    bad = np.nonzero(~(np.isfinite(values) & (values >= 1) & (values == np.floor(values))))[0]
    if len(bad):
        problems = [
            Problem(
                str(labels),
                "length",
                str(row),
                "whole_number_ge_1",
                f"{table['length'].iloc[row]!r} is not a frame count (a whole number >= 1)",
            )
            for row in bad[:MAX_REPORTED]
        ]
        if len(bad) > MAX_REPORTED:
            more = f"and {len(bad) - MAX_REPORTED} more rows like these"
            problems.append(Problem(str(labels), "length", "-", "whole_number_ge_1", more))
        raise DataContractError(problems)
    return values.astype(np.int64)


def check_frames(labels: Path, lengths: np.ndarray, frames: int) -> None:
    """Refuse lengths that do not sum to the ``frames`` of the array, naming the first row
    that runs past the last frame, or the last row when frames are left over."""
    ends = np.cumsum(lengths)
    total = int(ends[-1]) if len(ends) else 0
    if total == frames:
        return
    if total > frames:
        row = int(np.searchsorted(ends, frames, side="right"))
        start = int(ends[row] - lengths[row])
        where = (
            f"row {row} (length {lengths[row]}) would span frames {start}..{int(ends[row])}, "
            f"past the array's end; the lengths ask for {total - frames} frames more than there are"
        )
    else:
        row = len(lengths) - 1
        where = (
            f"the last row, {row}, ends at frame {total}, so {frames - total} frames belong "
            "to no row"
        )
    raise fail(
        labels,
        "length",
        row,
        "frames",
        f"lengths sum to {total} over {len(lengths)} rows, the array has {frames} frames: {where}",
    )


def split_problems(
    labels: Path, label_values: np.ndarray, splits: np.ndarray, given: bool
) -> list[Problem]:
    """Every class needs a sample in each split: the gaps, named in the user's table (its
    ``split`` column when it has one, else the ``label`` column and the fractions)."""
    counts = pd.crosstab(pd.Series(label_values, name="label"), pd.Series(splits, name="split"))
    counts = counts.reindex(columns=list(SPLITS), fill_value=0)
    if given:
        present = sorted(set(splits))
        absent = [s for s in SPLITS if counts[s].sum() == 0]
        problems = [
            Problem(
                str(labels),
                "split",
                "-",
                f"has_{split}",
                f"no row has split {split!r} (the column holds {present}); every class needs "
                f"a {'/'.join(SPLITS)} sample: add {split} rows, or drop the split column to "
                "have the splits drawn per class with the val and test fractions",
            )
            for split in absent
        ]
        for split in (s for s in SPLITS if s not in absent):
            for name in counts.index[counts[split] == 0]:
                found = ", ".join(f"{s} {int(counts.at[name, s])}" for s in SPLITS)
                problems.append(
                    Problem(
                        str(labels),
                        "split",
                        "-",
                        f"class_in_{split}",
                        f"class {name!r} has no {split} row (its rows: {found})",
                    )
                )
        return problems
    problems = []
    for split in SPLITS:
        for name in counts.index[counts[split] == 0]:
            total = int(counts.loc[name].sum())
            problems.append(
                Problem(
                    str(labels),
                    "label",
                    "-",
                    f"class_in_{split}",
                    f"class {name!r} has {total} row(s), too few to draw a {split} sample with "
                    "the val and test fractions; add samples of it, or give a split column",
                )
            )
    return problems
