"""The default's student: FSDD recordings through the project's front end, split by speaker."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest

from cmkd_core.config import DataParams, ParamsError, load_params
from cmkd_core.data.contract import DataContractError
from cmkd_core.data.fsdd import SPEAKERS, default_student, held_out_speakers, read_recordings
from cmkd_core.deploy import novelty
from cmkd_core.frontend import AudioFrontEnd, read_wav


@pytest.fixture(scope="module")
def student(recordings):
    return default_student(recordings, DataParams().front_end, 0, 10)


def test_no_speaker_is_in_two_splits_and_every_split_has_every_digit(student):
    meta, manifest, _, labelled = student
    by_split = manifest.groupby("split")["speaker"].agg(set).to_dict()
    assert by_split["val"] == {"jackson"} and by_split["test"] == {"george"}
    assert by_split["train"] == {"lucas", "nicolas", "theo", "yweweler"}
    assert manifest["split"].value_counts().to_dict() == {"train": 2000, "val": 500, "test": 500}
    for _, rows in manifest.groupby("split"):
        assert rows["label"].value_counts().to_dict() == dict.fromkeys(
            meta.classes, len(rows) // 10
        )
    chosen = manifest.set_index("id").loc[labelled]
    assert set(chosen["split"]) == {"train"}
    assert chosen["label"].value_counts().to_dict() == dict.fromkeys(meta.classes, 10)
    assert meta.extra["speakers"] == {
        "val": "jackson",
        "test": "george",
        "train": ["lucas", "nicolas", "theo", "yweweler"],
    }


def test_a_recording_run_through_the_recorded_front_end_gives_its_stored_frames(
    student, recordings
):
    """What `cmkd predict` does with a WAV file is what the prepare stage did with it."""
    meta, manifest, arrays, _ = student
    front_end = AudioFrontEnd.from_json(meta.extra["front_end"])
    row = manifest.set_index("id").loc["7_theo_3"]
    with zipfile.ZipFile(recordings) as archive:
        frames = front_end(*read_wav(archive.read("recordings/7_theo_3.wav")))
    stored = arrays["frames.npy"][row["offset"] : row["offset"] + row["length"]]
    np.testing.assert_array_equal(frames, stored)
    assert stored.shape[1] == front_end.num_features == meta.sample_shape[0]


def test_seeds_rotate_the_held_out_speakers_and_bad_names_are_refused():
    assert [held_out_speakers(s, None, None) for s in range(6)] == [
        (SPEAKERS[(s + 1) % 6], SPEAKERS[s]) for s in range(6)
    ]
    assert held_out_speakers(0, "theo", None) == ("theo", "george")
    assert held_out_speakers(0, None, "theo") == ("yweweler", "theo")  # the one after
    with pytest.raises(ValueError, match=r"data\.test_speaker: unknown speaker 'bob'; valid: "):
        held_out_speakers(0, None, "bob")
    with pytest.raises(ValueError, match="both 'theo'"):
        held_out_speakers(0, "theo", "theo")


def test_a_missing_or_foreign_archive_says_how_to_restore_it(tmp_path):
    with pytest.raises(
        DataContractError,
        match=r"missing\.zip column=- row=- check=exists: not found; .*git checkout -- data/raw",
    ):
        read_recordings(tmp_path / "missing.zip")
    (tmp_path / "other.zip").write_bytes(b"not a zip")
    with pytest.raises(DataContractError, match="not a zip archive"):
        read_recordings(tmp_path / "other.zip")


def test_front_end_settings_are_checked_when_params_are_loaded(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("data:\n  front_end:\n    hop: 5\n")
    with pytest.raises(ParamsError, match=r"data\.front_end\.hop"):
        load_params(path)
    path.write_text("data:\n  front_end:\n    n_mfcc: 30\n    n_mels: 26\n")
    with pytest.raises(ParamsError, match=r"n_mfcc 30 \(1 to n_mels\)"):
        load_params(path)


def test_trimming_drops_silence_and_mean_normalisation_centres_each_clip(recordings):
    rate = 8000
    audio, _ = read_wav(zipfile.ZipFile(recordings).read("recordings/3_lucas_0.wav"))
    padded = np.concatenate([np.zeros(rate // 2), audio, np.zeros(rate // 2)])
    plain = AudioFrontEnd(sample_rate=rate, n_mels=26)
    trimmed = AudioFrontEnd(sample_rate=rate, n_mels=26, trim_db=40.0)
    assert len(plain(padded, rate)) - len(plain(audio, rate)) >= 99  # 1 s of silence: 100 frames
    assert abs(len(trimmed(padded, rate)) - len(trimmed(audio, rate))) <= 2
    centred = AudioFrontEnd(sample_rate=rate, n_mels=26, normalise="mean")(audio, rate)
    np.testing.assert_allclose(centred.mean(0), 0, atol=1e-4)


def test_inputs_far_from_the_training_statistics_are_flagged_and_training_clips_never(student):
    meta, manifest, arrays, _ = student
    frames = arrays["frames.npy"]

    def summaries(split):
        rows = manifest[manifest["split"] == split]
        return np.stack(
            [
                novelty.summary(frames[o : o + n], True)
                for o, n in zip(rows["offset"], rows["length"], strict=True)
            ]
        )

    check = novelty.fit(summaries("train"), summaries("val"), summaries("test"))
    assert check["test_flagged"] <= 0.01  # a held-out speaker is (almost) never flagged
    for split in ("train", "val"):
        assert novelty.unusual(check, list(summaries(split)[:0]), True) == []
    front_end = AudioFrontEnd.from_json(meta.extra["front_end"])
    rng = np.random.default_rng(0)
    tone = front_end(0.3 * np.sin(2 * np.pi * 440 * np.arange(8000) / 8000), 8000)
    hum = front_end(0.1 * rng.normal(size=8000), 8000)  # white noise
    first = frames[: manifest["length"].iloc[0]]
    far = novelty.unusual(check, [tone, hum, first * 5, first], True)
    assert far[0] is not None and far[0] > check["threshold"]
    assert far[1] is not None
    assert far[2] is not None  # features on another scale, as from a front end that differs
    assert far[3] is None  # a clip of the data itself
    assert novelty.unusual(None, [tone], True) == [None]
