"""The paper's benchmark layouts (CREMA-D, AVE, VGGSound, RAVDESS): each test builds a
miniature copy of the tree, with real WAV files and frame images, converts it and checks both
contract datasets; broken copies are refused with the file and row."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.io import wavfile

from cmkd_app.cli import main
from cmkd_core.data import DataContractError, check_dataset
from cmkd_core.data.layouts import RAVDESS_EMOTIONS, import_layout, pick_frames, read_layout
from cmkd_core.frontend import AudioFrontEnd, ImageFrontEnd

RNG = np.random.default_rng(0)
AUDIO = AudioFrontEnd(sample_rate=8000)
IMAGE = ImageFrontEnd(12, 12)


def _clip(root: Path, wav: str, frames: str, n_frames: int = 3, rate: int = 16000) -> None:
    """One clip: a WAV of a tone (its pitch drawn at random) and ``n_frames`` RGB frames."""
    (root / wav).parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(rate * 0.2)) / rate
    tone = 0.3 * np.sin(2 * np.pi * RNG.uniform(200, 2000) * t)
    wavfile.write(root / wav, rate, (tone * 32767).astype(np.int16))
    (root / frames).mkdir(parents=True, exist_ok=True)
    for k in range(n_frames):
        pixels = RNG.integers(0, 255, size=(20, 24, 3), dtype=np.uint8)
        Image.fromarray(pixels, "RGB").save(root / frames / f"frame_{k:05d}.jpg")


def _cremad(root: Path, per_class: int = 4) -> None:
    rows = {"train": [], "test": []}
    for c, label in enumerate(["NEU", "HAP", "SAD", "FEA", "DIS", "ANG"]):
        for i in range(per_class):
            clip = f"10{c}{i}_IEO_{label}_HI"
            _clip(root, f"audio/{clip}.wav", f"visual/{clip}")
            rows["test" if i == 0 else "train"].append(f"{clip},{label}")
    for split, lines in rows.items():
        (root / f"{split}.csv").write_text("\n".join(lines) + "\n")


def _ave(root: Path) -> None:
    categories = ["Church bell", "Male speech, man speaking", "Dog"]
    files = {"trainSet.txt": [], "valSet.txt": [], "testSet.txt": []}
    for c, category in enumerate(categories):
        for i, name in enumerate(["trainSet.txt"] * 3 + ["valSet.txt", "testSet.txt"]):
            video = f"vid{c}x{i}"
            _clip(root, f"audio/{video}.wav", f"visual/{video}")
            files[name].append(f"{category}&{video}&good&0&10")
    for name, lines in files.items():
        header = ["Category&VideoID&Quality&StartTime&EndTime"] if name == "trainSet.txt" else []
        (root / name).write_text("\n".join(header + lines) + "\n")


def _vggsound(root: Path) -> None:
    index = []
    for c, label in enumerate(["playing drum kit", "dog barking"]):
        for i in range(5):
            split = "test" if i == 4 else "train"
            youtube_id, start = f"yt{c}{i}", 30 + i
            sample = f"{youtube_id}_{start:06d}"
            _clip(root, f"{split}/{sample}/{sample}.wav", f"{split}/{sample}")
            index.append(f'{youtube_id},{start},"{label}",{split}')
    index.append("notdownloaded,0,cat purring,train")  # listed but absent: not part of the copy
    (root / "vggsound.csv").write_text("\n".join(index) + "\n")


def _ravdess(root: Path) -> None:
    for actor in (1, 2, 17, 21):
        for emotion in ("01", "05", "08"):
            name = f"01-{emotion}-02-01-01-{actor:02d}"
            folder = f"Actor_{actor:02d}"
            _clip(root, f"audio/{folder}/03-{name}.wav", f"visual/{folder}/01-{name}")


BUILDERS = {"cremad": _cremad, "ave": _ave, "vggsound": _vggsound, "ravdess": _ravdess}
EXPECTED = {  # classes, clips per split
    "cremad": (6, {"train": 12, "val": 6, "test": 6}),
    "ave": (3, {"train": 9, "val": 3, "test": 3}),
    "vggsound": (2, {"train": 6, "val": 2, "test": 2}),
    "ravdess": (3, {"train": 6, "val": 3, "test": 3}),
}


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_a_miniature_copy_of_each_layout_converts(tmp_path, kind):
    BUILDERS[kind](tmp_path / "src")
    written = import_layout(
        kind, tmp_path / "src", tmp_path / "out", audio=AUDIO, image=IMAGE, val_fraction=0.34
    )
    teacher, student = check_dataset(written["teacher"]), check_dataset(written["student"])
    classes, per_split = EXPECTED[kind]
    assert teacher.meta.modality == "image" and teacher.meta.sample_shape == (12, 12)
    assert student.meta.modality == "audio" and student.meta.kind == "sequence"
    assert student.meta.sample_shape == (AUDIO.num_features,)
    assert len(teacher.meta.classes) == classes and teacher.meta.classes == student.meta.classes
    assert student.meta.extra["front_end"]["sample_rate"] == 8000
    for ds in (teacher, student):
        assert ds.manifest["split"].value_counts().to_dict() == per_split
    # each audio clip's pair is its frame, with the same label and split
    frames = teacher.manifest.set_index("id")
    for row in student.manifest.itertuples():
        assert frames.loc[row.pair, "label"] == row.label
        assert frames.loc[row.pair, "split"] == row.split
        assert frames.loc[row.pair, "pair"] == row.id
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]


def test_layout_details_labels_splits_and_frame_choice(tmp_path):
    _ravdess(tmp_path / "rav")
    table = read_layout("ravdess", tmp_path / "rav")
    assert set(table["label"]) == {RAVDESS_EMOTIONS[e] for e in ("01", "05", "08")}
    actors = table["id"].str[-2:].astype(int)
    assert set(actors[table["split"] == "test"]) == {21}
    assert set(actors[table["split"] == "val"]) == {17}
    (tmp_path / "rav" / "splits.csv").write_text("actor,split\n1,train\n2,test\n17,train\n21,val\n")
    again = read_layout("ravdess", tmp_path / "rav")
    assert set(again["id"][again["split"] == "test"].str[-2:]) == {"02"}

    _ave(tmp_path / "ave")
    ave = read_layout("ave", tmp_path / "ave")
    assert "Male speech, man speaking" in set(ave["label"])  # comma kept: '&' separates
    assert (ave["split"] == "val").sum() == 3  # valSet.txt used, nothing carved

    _vggsound(tmp_path / "vgg")
    assert "cat purring" not in set(read_layout("vggsound", tmp_path / "vgg")["label"])

    folder = tmp_path / "frames"
    folder.mkdir()
    for k in range(10):
        (folder / f"{k:02d}.png").touch()
    assert [p.name for p in pick_frames(folder, 1)] == ["05.png"]
    assert [p.name for p in pick_frames(folder, 3)] == ["01.png", "05.png", "08.png"]


def test_several_frames_per_clip_and_audio_as_teacher(tmp_path):
    _cremad(tmp_path / "src", per_class=3)
    written = import_layout(
        "cremad",
        tmp_path / "src",
        tmp_path / "out",
        audio=AUDIO,
        image=IMAGE,
        teacher="audio",
        frames=2,
        labelled_per_class=1,
    )
    teacher, student = check_dataset(written["teacher"]), check_dataset(written["student"])
    assert teacher.meta.modality == "audio" and student.meta.modality == "image"
    assert len(student.manifest) == 2 * len(teacher.manifest)
    assert student.manifest["id"].str.endswith(("/0", "/1")).all()
    assert len(student.labelled_ids) == 6  # one labelled frame per class on the student side


def _break(kind: str, root: Path) -> tuple[str, str]:
    """Damage a built copy; return (a file the message must name, a phrase it must hold)."""
    if kind == "missing_wav":
        victim = next((root / "audio").glob("*.wav"))
        victim.unlink()
        return victim.name, "no such file"
    if kind == "empty_frames":
        folder = next((root / "visual").iterdir())
        shutil.rmtree(folder)
        folder.mkdir()
        return folder.name, "0 frames"
    if kind == "bad_label":
        (root / "test.csv").write_text("1000_IEO_NEU_HI,BORED\n")
        return "test.csv", "BORED"
    if kind == "twice":
        lines = (root / "train.csv").read_text().splitlines()
        (root / "test.csv").write_text(lines[0] + "\n")
        return "test.csv", "listed twice"
    if kind == "short_row":
        (root / "train.csv").write_text("1000_IEO_NEU_HI\n")
        return "train.csv", "1 fields"
    if kind == "no_test_clip":  # a class missing from test.csv: named there, not in a manifest
        lines = (root / "test.csv").read_text().splitlines()
        (root / "test.csv").write_text("\n".join(x for x in lines if not x.endswith(",ANG")))
        return "test.csv", "column=label row=- check=class_in_test: class 'ANG' has no test clip"
    if kind == "corrupt_wav":
        victim = next((root / "audio").glob("*.wav"))
        victim.write_bytes(b"RIFF....WAVEjunk")
        return victim.name, "wav"
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "damage",
    [
        "missing_wav",
        "empty_frames",
        "bad_label",
        "twice",
        "short_row",
        "no_test_clip",
        "corrupt_wav",
    ],
)
def test_a_broken_copy_is_refused_with_the_file_and_nothing_written(tmp_path, damage):
    _cremad(tmp_path / "src", per_class=3)
    named, phrase = _break(damage, tmp_path / "src")
    out = tmp_path / "out"
    with pytest.raises(DataContractError) as caught:
        import_layout("cremad", tmp_path / "src", out, audio=AUDIO, image=IMAGE)
    assert named in str(caught.value) and phrase in str(caught.value)
    assert not out.exists() or list(out.iterdir()) == []


def test_ravdess_clip_without_its_video_is_refused(tmp_path):
    _ravdess(tmp_path / "rav")
    shutil.rmtree(next((tmp_path / "rav" / "visual" / "Actor_02").iterdir()))
    with pytest.raises(DataContractError, match="no frames for clip"):
        read_layout("ravdess", tmp_path / "rav")


def test_cli_imports_a_layout_into_the_import_folder(tmp_path, capsys):
    _vggsound(tmp_path / "vgg")
    out = tmp_path / "import"
    argv = ["import-layout", "vggsound", str(tmp_path / "vgg"), str(out), "--height", "10"]
    argv += ["--width", "10", "--sample-rate", "8000", "--labelled-per-class", "2"]
    assert main(argv) == 0
    assert "teacher" in capsys.readouterr().out
    assert check_dataset(out / "teacher").meta.sample_shape == (10, 10)
    assert len(check_dataset(out / "student").labelled_ids) == 4
    assert main(argv) == 2  # the folders exist now: refused, nothing touched
    assert "exists already" in capsys.readouterr().err
