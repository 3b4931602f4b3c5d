"""Converters for the preprocessed audio-visual layouts the paper's benchmarks use.

Each benchmark ships, after the usual preprocessing (videos cut into frame folders, audio
tracks into WAV files), as one of these trees under a root folder:

``cremad`` (CREMA-D, 6 emotions)
    ``audio/CLIP.wav``, ``visual/CLIP/`` (frames), ``train.csv`` and ``test.csv`` (optional
    ``val.csv``): rows ``CLIP,LABEL`` without a header, labels ``NEU HAP SAD FEA DIS ANG``.
``ave`` (AVE, 28 events)
    ``audio/VIDEO.wav``, ``visual/VIDEO/``, ``trainSet.txt``, ``valSet.txt``, ``testSet.txt``:
    rows ``Category&VideoID&Quality&StartTime&EndTime`` (a header row is skipped).
``vggsound`` (VGGSound or a class subset of it)
    ``train/SAMPLE/`` and ``test/SAMPLE/``, each holding the frames and ``SAMPLE.wav``;
    ``vggsound.csv`` rows ``youtube_id,start_seconds,label,split`` without a header, where
    ``SAMPLE`` is ``youtube_id`` and the start second written with six digits. The split is the
    folder's; the classes are those of the samples present.
``ravdess`` (RAVDESS, 8 emotions)
    ``audio/Actor_NN/03-VC-EE-II-SS-RR-AA.wav`` and ``visual/Actor_NN/MM-VC-EE-II-SS-RR-AA/``
    (``MM`` 01 or 02, from the audio-video or video-only file), the fields named by the
    dataset: emotion ``EE`` is the label, ``AA`` the actor. Splits are by actor: actors 1-16
    train, 17-20 val, 21-24 test, or ``splits.csv`` with columns ``actor,split``.

:func:`read_layout` lists the clips as a table (``id``, ``label``, ``split``, ``audio``,
``frames``); :func:`import_layout` runs the WAV and image converters over it and writes two
contract datasets, one per modality, whose ``pair`` columns record which clip each sample came
from (the unpaired methods ignore them). Where a layout has no validation split, one is drawn
from its train split, stratified by class. Every problem is reported with the file and row.
"""

from __future__ import annotations

import csv
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from cmkd_core.data.contract import DataContractError, Problem
from cmkd_core.data.importers import import_images, import_wav
from cmkd_core.frontend import AudioFrontEnd, ImageFrontEnd

CREMAD_CLASSES = ("NEU", "HAP", "SAD", "FEA", "DIS", "ANG")
RAVDESS_EMOTIONS = {
    "01": "neutral",
    "02": "calm",
    "03": "happy",
    "04": "sad",
    "05": "angry",
    "06": "fearful",
    "07": "disgust",
    "08": "surprised",
}
FRAME_SUFFIXES = (".jpg", ".jpeg", ".png")
COLUMNS = ["id", "label", "split", "audio", "frames"]


def _fail(file: Path | str, row: object, check: str, detail: str, column: str = "-"):
    return DataContractError([Problem(str(file), column, str(row), check, detail)])


def _rows(path: Path, delimiter: str, fields: int) -> list[list[str]]:
    """The rows of a header-less split file, each checked to have at least ``fields`` fields."""
    if not path.is_file():
        raise _fail(path, "-", "exists", "no such file")
    with path.open(newline="", encoding="utf-8") as handle:
        rows = [r for r in csv.reader(handle, delimiter=delimiter) if any(f.strip() for f in r)]
    for number, row in enumerate(rows):
        if len(row) < fields:
            raise _fail(path, number, "fields", f"{len(row)} fields, expected {fields}: {row}")
    return rows


def _cremad(root: Path) -> pd.DataFrame:
    records = []
    for split in ("train", "val", "test"):
        path = root / f"{split}.csv"
        if split == "val" and not path.exists():
            continue
        for number, (clip, label, *_) in enumerate(_rows(path, ",", 2)):
            if label not in CREMAD_CLASSES:
                raise _fail(path, number, "isin", f"label {label!r} not in {CREMAD_CLASSES}")
            records.append((clip, label, split, f"audio/{clip}.wav", f"visual/{clip}", path))
    return pd.DataFrame(records, columns=[*COLUMNS, "listed_in"])


def _ave(root: Path) -> pd.DataFrame:
    records = []
    for split, name in (("train", "trainSet.txt"), ("val", "valSet.txt"), ("test", "testSet.txt")):
        path = root / name
        for number, (category, video, *_) in enumerate(_rows(path, "&", 2)):
            if number == 0 and category == "Category":
                continue  # the header row of the annotation files
            records.append((video, category, split, f"audio/{video}.wav", f"visual/{video}", path))
    return pd.DataFrame(records, columns=[*COLUMNS, "listed_in"])


def _vggsound(root: Path) -> pd.DataFrame:
    index = root / "vggsound.csv"
    labels = {}
    for youtube_id, start, label, *_ in _rows(index, ",", 3):
        try:
            labels[f"{youtube_id}_{int(start):06d}"] = label
        except ValueError:
            raise _fail(index, youtube_id, "int", f"start second {start!r}") from None
    records = []
    for split in ("train", "test"):
        folder = root / split
        if not folder.is_dir():
            raise _fail(folder, "-", "exists", "no such folder")
        for sample in sorted(p.name for p in folder.iterdir() if p.is_dir()):
            if sample not in labels:
                raise _fail(folder / sample, "-", "listed", f"{sample!r} is not in {index}")
            where = f"{split}/{sample}"
            records.append((sample, labels[sample], split, f"{where}/{sample}.wav", where, folder))
    return pd.DataFrame(records, columns=[*COLUMNS, "listed_in"])


_RAVDESS_NAME = re.compile(r"^(0[123])-(0[12])-(0[1-8])-(0[12])-(0[12])-(0[12])-(\d\d)$")


def _ravdess_split(root: Path) -> Callable[[int], str]:
    path = root / "splits.csv"
    if not path.exists():
        return lambda actor: "train" if actor <= 16 else "val" if actor <= 20 else "test"
    table = pd.read_csv(path)
    for column in ("actor", "split"):
        if column not in table.columns:
            raise _fail(path, "-", "required", f"columns are {list(table.columns)}", column)
    chosen = dict(zip(table["actor"].astype(int), table["split"].astype(str), strict=True))

    def split(actor: int) -> str:
        if actor not in chosen:
            raise _fail(path, "-", "listed", f"actor {actor} has no split", "actor")
        return chosen[actor]

    return split


def _ravdess(root: Path) -> pd.DataFrame:
    split_of = _ravdess_split(root)
    clips: dict[str, dict[str, str]] = {}
    for modality, pattern in (("audio", "audio/Actor_*/*.wav"), ("frames", "visual/Actor_*/*")):
        for path in sorted(root.glob(pattern)):
            match = _RAVDESS_NAME.match(path.stem)
            wanted = ("03",) if modality == "audio" else ("01", "02")
            if match is None or match.group(1) not in wanted:
                raise _fail(path, "-", "name", "not a RAVDESS name MM-VC-EE-II-SS-RR-AA")
            clip = path.stem[3:]  # the name without the modality field
            clips.setdefault(clip, {})[modality] = str(path.relative_to(root))
    if not clips:
        raise _fail(root / "audio", "-", "exists", "no RAVDESS clips under audio/ and visual/")
    records = []
    for clip, found in sorted(clips.items()):
        for modality in ("audio", "frames"):
            if modality not in found:
                other = root / next(iter(found.values()))
                raise _fail(other, clip, "paired", f"no {modality} for clip {clip}")
        actor = int(clip.split("-")[-1])
        label = RAVDESS_EMOTIONS[clip.split("-")[1]]
        records.append((clip, label, split_of(actor), found["audio"], found["frames"], root))
    return pd.DataFrame(records, columns=[*COLUMNS, "listed_in"])


LAYOUTS: dict[str, Callable[[Path], pd.DataFrame]] = {
    "cremad": _cremad,
    "ave": _ave,
    "vggsound": _vggsound,
    "ravdess": _ravdess,
}


def read_layout(
    kind: str, root: str | Path, val_fraction: float = 0.1, seed: int = 0
) -> pd.DataFrame:
    """The clips of the ``kind`` layout under ``root``: one row per clip with ``id``,
    ``label``, ``split`` (train/val/test), ``audio`` (the WAV file) and ``frames`` (the frame
    folder), both relative to ``root`` and checked to exist. Without a val split, a
    ``val_fraction`` of each class's train clips (at least one) becomes val (seeded)."""
    if kind not in LAYOUTS:
        raise ValueError(f"unknown layout {kind!r}; known: {sorted(LAYOUTS)}")
    root = Path(root)
    if not root.is_dir():
        raise _fail(root, "-", "exists", "no such folder")
    table = LAYOUTS[kind](root)
    if table.empty:
        raise _fail(root, "-", "rows", f"the {kind} layout lists no clips")
    repeated = table["id"].duplicated().to_numpy().nonzero()[0]
    if len(repeated):
        first = table.iloc[repeated[0]]
        raise _fail(first["listed_in"], first["id"], "unique", "clip listed twice", "id")
    for row in table.itertuples():
        if not (root / row.audio).is_file():
            raise _fail(row.listed_in, row.id, "exists", f"{root / row.audio}: no such file")
        if not (root / row.frames).is_dir():
            raise _fail(row.listed_in, row.id, "exists", f"{root / row.frames}: no such folder")
    drawn = not (table["split"] == "val").any()
    if drawn:
        rng = np.random.default_rng(seed)
        for _, rows in table[table["split"] == "train"].groupby("label", sort=True):
            if len(rows) > 1:  # every class keeps a train clip and gets a val clip
                count = min(len(rows) - 1, max(1, round(val_fraction * len(rows))))
                table.loc[rng.permutation(rows.index)[:count], "split"] = "val"
    gaps = _split_gaps(table, kind, root, drawn)
    if gaps:
        raise DataContractError(gaps)
    return table.drop(columns="listed_in").reset_index(drop=True)


def _split_gaps(table: pd.DataFrame, kind: str, root: Path, drawn: bool) -> list[Problem]:
    """Every class needs a clip in train, val and test: the gaps, each naming the list the
    split comes from (``root`` when the layout has no clip of that split at all)."""
    problems = []
    for split in ("train", "val", "test"):
        rows = table[table["split"] == split]
        listed = rows["listed_in"].iloc[0] if len(rows) else root
        present = set(rows["label"])
        why = ""
        if split == "val" and drawn:
            why = " (val clips are drawn from a class's train clips when it has two or more)"
        for name in sorted(set(table["label"]) - present):
            detail = f"class {name!r} has no {split} clip in the {kind} layout{why}"
            problems.append(Problem(str(listed), "label", "-", f"class_in_{split}", detail))
    return problems


def pick_frames(folder: Path, count: int) -> list[Path]:
    """``count`` frames spread evenly over the sorted image files of ``folder`` (the middle
    one for ``count=1``)."""
    frames = sorted(p for p in folder.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
    if len(frames) < count:
        raise _fail(folder, "-", "frames", f"{len(frames)} frames, {count} wanted")
    return [frames[int((i + 0.5) * len(frames) / count)] for i in range(count)]


def import_layout(
    kind: str,
    root: str | Path,
    out: str | Path,
    *,
    audio: AudioFrontEnd,
    image: ImageFrontEnd,
    teacher: str = "visual",
    frames: int = 1,
    val_fraction: float = 0.1,
    seed: int = 0,
    labelled_per_class: int | None = None,
) -> dict[str, Path]:
    """Write ``out/teacher`` and ``out/student`` from the ``kind`` layout under ``root``.

    The ``teacher`` modality (``visual`` or ``audio``) goes to ``out/teacher``, the other to
    ``out/student`` (with ``labelled.csv`` when ``labelled_per_class`` is given). Each clip
    gives one audio sample (``audio`` front end) and ``frames`` image samples (``image`` front
    end) with ids ``CLIP`` and ``CLIP/K``. Both datasets are written under staging names in
    ``out`` and renamed at the end: a failure leaves neither.
    """
    if teacher not in ("visual", "audio"):
        raise ValueError(f"teacher must be 'visual' or 'audio', not {teacher!r}")
    root, out = Path(root), Path(out)
    targets = {"teacher": out / "teacher", "student": out / "student"}
    for target in targets.values():
        if target.exists():
            raise _fail(target, "-", "absent", "exists already; choose a new folder")
    table = read_layout(kind, root, val_fraction, seed)
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{kind}.", dir=out))
    try:
        shots = []
        for row in table.itertuples():
            for k, frame in enumerate(pick_frames(root / row.frames, frames)):
                frame_id = row.id if frames == 1 else f"{row.id}/{k}"
                shots.append((frame_id, row.label, row.split, str(frame.relative_to(root)), row.id))
        visual = pd.DataFrame(shots, columns=["id", "label", "split", "file", "pair"])
        first_shot = visual.drop_duplicates("pair").set_index("pair")["id"]
        sound = table.rename(columns={"audio": "file"})[["id", "label", "split", "file"]]
        sound = sound.assign(pair=first_shot.loc[table["id"]].to_numpy())
        visual.to_csv(staging / "visual.csv", index=False)
        sound.to_csv(staging / "audio.csv", index=False)
        roles = {"visual": "teacher", "audio": "student"}
        if teacher == "audio":
            roles = {"visual": "student", "audio": "teacher"}
        budget = {m: labelled_per_class if role == "student" else None for m, role in roles.items()}
        import_images(
            root,
            staging / "visual.csv",
            staging / "visual",
            name=f"{kind}-visual",
            front_end=image,
            labelled_per_class=budget["visual"],
            seed=seed,
        )
        import_wav(
            root,
            staging / "audio.csv",
            staging / "audio",
            name=f"{kind}-audio",
            front_end=audio,
            labelled_per_class=budget["audio"],
            seed=seed,
        )
        written = []
        try:
            for modality, role in roles.items():
                (staging / modality).rename(targets[role])
                written.append(targets[role])
        except OSError:
            for path in written:
                shutil.rmtree(path, ignore_errors=True)
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return targets
