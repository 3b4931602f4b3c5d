"""The student side of the embedded default: the Free Spoken Digit Dataset's recordings.

``data/raw/fsdd-recordings-1.0.10.zip`` (committed with the project, CC BY-SA 4.0, attribution
in ``data/raw/FSDD.md``) holds ``recordings/{digit}_{speaker}_{index}.wav``: 3,000 WAV files,
8 kHz mono 16-bit, 6 speakers x 10 digits x 50 takes. They are turned into frames by the
project's own :class:`~cmkd_core.frontend.AudioFrontEnd`, whose settings are written into
``dataset.json`` and the model card, so a deployed student computes a new recording's input
exactly as its training data were computed. Splits are by speaker: the validation and the test
speaker never occur in train.
"""

from __future__ import annotations

import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cmkd_core.data.contract import DataContractError, DatasetMeta, Problem
from cmkd_core.frontend import AudioFrontEnd, read_wav

RECORDINGS = "data/raw/fsdd-recordings-1.0.10.zip"
SPEAKERS = ("george", "jackson", "lucas", "nicolas", "theo", "yweweler")
NAME = re.compile(r"recordings/(\d)_([a-z]+)_(\d+)\.wav")
CLASSES = tuple(str(d) for d in range(10))
FETCH_HINT = (
    f"the FSDD recordings are committed with the project: `git checkout -- {RECORDINGS}` "
    "(or take fsdd-recordings-1.0.10.zip from the FSDD repository, "
    "github.com/Jakobovski/free-spoken-digit-dataset, tag v1.0.10)"
)


@dataclass(frozen=True)
class Recording:
    """One FSDD recording: its digit, speaker, take index and samples ``(n,)`` at ``rate``."""

    digit: int
    speaker: str
    index: int
    audio: np.ndarray
    rate: int

    @property
    def id(self) -> str:
        return f"{self.digit}_{self.speaker}_{self.index}"


def read_recordings(archive: str | Path) -> list[Recording]:
    """Every recording in the FSDD zip at ``archive``, sorted by speaker, digit and take."""
    archive = Path(archive)
    if not archive.is_file():
        raise _missing(archive, "exists", "not found")
    found: list[Recording] = []
    try:
        with zipfile.ZipFile(archive) as zipped:
            for name in zipped.namelist():
                match = NAME.fullmatch(name)
                if match is None:
                    continue
                audio, rate = read_wav(zipped.read(name), f"{archive}:{name}")
                digit, speaker, index = int(match[1]), match[2], int(match[3])
                found.append(Recording(digit, speaker, index, audio, rate))
    except zipfile.BadZipFile as exc:
        raise _missing(archive, "zip", f"not a zip archive ({exc})") from None
    if not found:
        raise _missing(archive, "recordings", "no recordings/D_SPEAKER_N.wav in it")
    return sorted(found, key=lambda r: (r.speaker, r.digit, r.index))


def _missing(archive: Path, check: str, what: str) -> DataContractError:
    """The error for an archive that is not the FSDD recordings, with how to restore them."""
    return DataContractError([Problem(str(archive), "-", "-", check, f"{what}; {FETCH_HINT}")])


def held_out_speakers(seed: int, val: str | None, test: str | None) -> tuple[str, str]:
    """The validation and test speakers: those named; else the test speaker is
    ``SPEAKERS[seed % 6]`` and the validation speaker the one after the test speaker in
    :data:`SPEAKERS`, so seeds rotate who is held out."""
    test = test or SPEAKERS[seed % len(SPEAKERS)]
    for role, name in (("test_speaker", test), ("val_speaker", val)):
        if name is not None and name not in SPEAKERS:
            raise ValueError(f"data.{role}: unknown speaker {name!r}; valid: {', '.join(SPEAKERS)}")
    val = val or SPEAKERS[(SPEAKERS.index(test) + 1) % len(SPEAKERS)]
    if val == test:
        raise ValueError(f"data.val_speaker and data.test_speaker are both {val!r}: pick two")
    return val, test


def speaker_splits(speakers: np.ndarray, val: str, test: str) -> np.ndarray:
    """``train``/``val``/``test`` per sample of ``speakers`` (``(n,)`` names): the ``val`` and
    ``test`` speakers' recordings form those splits, everyone else's train."""
    splits = np.full(len(speakers), "train", dtype=object)
    splits[speakers == val] = "val"
    splits[speakers == test] = "test"
    return splits


def recordings_dataset(
    recordings: list[Recording], front_end: AudioFrontEnd, val: str, test: str
) -> tuple[DatasetMeta, pd.DataFrame, dict[str, np.ndarray]]:
    """The recordings through ``front_end`` in contract form: meta (with the front end and the
    held-out speakers), manifest (``id, label, split, speaker, file, offset, length``) and
    ``{"frames.npy": (total_frames, num_features)}``."""
    frames = [front_end(r.audio, r.rate) for r in recordings]
    lengths = np.array([len(f) for f in frames], dtype=np.int64)
    speakers = np.array([r.speaker for r in recordings])
    manifest = pd.DataFrame(
        {
            "id": [r.id for r in recordings],
            "label": [CLASSES[r.digit] for r in recordings],
            "split": speaker_splits(speakers, val, test),
            "speaker": speakers,
            "file": "frames.npy",
            "offset": np.concatenate([[0], np.cumsum(lengths)[:-1]]),
            "length": lengths,
        }
    )
    meta = DatasetMeta(
        name="free-spoken-digits",
        modality="audio",
        kind="sequence",
        sample_shape=(front_end.num_features,),
        classes=CLASSES,
        source="Free Spoken Digit Dataset v1.0.10 recordings (CC BY-SA 4.0), data/raw/FSDD.md",
        extra={
            "front_end": front_end.to_json(),
            "speakers": {
                "val": val,
                "test": test,
                "train": sorted(str(s) for s in set(speakers) - {val, test}),
            },
        },
    )
    return meta, manifest, {"frames.npy": np.concatenate(frames).astype(np.float32)}


def default_student(
    archive: str | Path,
    front_end: AudioFrontEnd,
    seed: int,
    labelled_per_class: int | None,
    val: str | None = None,
    test: str | None = None,
) -> tuple[DatasetMeta, pd.DataFrame, dict[str, np.ndarray], list[str]]:
    """The default's student in contract form (:func:`recordings_dataset`, speakers by
    :func:`held_out_speakers`) and the ids of its labelled train samples, drawn per class
    with ``seed``."""
    from cmkd_core.data.defaults import labelled_subset

    meta, manifest, arrays = recordings_dataset(
        read_recordings(archive), front_end, *held_out_speakers(seed, val, test)
    )
    labels, splits = manifest["label"].to_numpy(), manifest["split"].to_numpy()
    mask = labelled_subset(labels, splits, labelled_per_class, seed)
    return meta, manifest, arrays, list(manifest.loc[mask, "id"])
