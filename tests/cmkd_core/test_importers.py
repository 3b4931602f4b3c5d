"""``cmkd import arrays``: fixed-size and sequence data in, a valid contract folder out; bad
input refused with the file, column and row, and nothing left behind."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cmkd_app.cli import main
from cmkd_core.data import DataContractError, check_dataset
from cmkd_core.data.importers import import_arrays

RNG = np.random.default_rng(0)


def _labels(n: int, classes: int = 4) -> pd.DataFrame:
    return pd.DataFrame({"label": [f"c{i % classes}" for i in range(n)]})


def test_fixed_size_arrays_become_a_valid_dataset(tmp_path):
    x = RNG.normal(size=(60, 4, 4)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    _labels(60).to_csv(tmp_path / "labels.csv", index=False)
    out = import_arrays(
        tmp_path / "x.npy",
        tmp_path / "labels.csv",
        tmp_path / "ds",
        name="toy",
        modality="image",
        labelled_per_class=3,
        chunk=7,  # several chunks
    )
    ds = check_dataset(out)
    assert ds.meta.kind == "fixed" and ds.meta.sample_shape == (4, 4)
    assert ds.meta.classes == ("c0", "c1", "c2", "c3")
    assert len(ds.manifest) == 60 and len(ds.labelled_ids) == 12
    counts = ds.manifest.groupby(["label", "split"]).size()
    assert (counts.xs("train", level="split") == 9).all()  # 15 per class: 9/3/3
    np.testing.assert_array_equal(ds.fixed_arrays(ds.manifest), x)


def test_sequences_from_frames_and_lengths_and_from_a_padded_npz(tmp_path):
    lengths = RNG.integers(3, 9, size=40)
    frames = RNG.normal(size=(lengths.sum(), 5)).astype(np.float32)
    np.save(tmp_path / "frames.npy", frames)
    table = _labels(40).assign(length=lengths, split=["train"] * 24 + ["val"] * 8 + ["test"] * 8)
    table.to_csv(tmp_path / "labels.csv", index=False)
    a = check_dataset(
        import_arrays(
            tmp_path / "frames.npy",
            tmp_path / "labels.csv",
            tmp_path / "a",
            name="seq",
            modality="audio",
            chunk=2,
        )
    )
    assert a.meta.kind == "sequence" and a.meta.sample_shape == (5,)
    assert list(a.manifest["length"]) == list(lengths)
    assert list(a.manifest["split"][:24]) == ["train"] * 24
    padded = np.zeros((40, lengths.max(), 5), np.float32)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    for i, (s, n) in enumerate(zip(starts, lengths, strict=True)):
        padded[i, :n] = frames[s : s + n]
    np.savez(tmp_path / "padded.npz", x=padded, lengths=lengths)
    table.drop(columns="length").to_csv(tmp_path / "labels.csv", index=False)  # lengths in npz
    b = check_dataset(
        import_arrays(
            tmp_path / "padded.npz",
            tmp_path / "labels.csv",
            tmp_path / "b",
            name="seq",
            modality="audio",
        )
    )
    np.testing.assert_array_equal(np.load(b.root / "samples.npy"), frames)


def _case(tmp_path, name):
    """Write one malformed input; return (arrays, labels, expected message)."""
    x = RNG.normal(size=(40, 3)).astype(np.float32)
    labels = _labels(40)
    expected = None
    if name == "nan":
        x[17, 1] = np.nan
        expected = "x.npy column=- row=17 check=finite"
    elif name == "rows":
        labels = labels.iloc[:39]
        expected = "labels.csv column=- row=40 check=rows: 39 rows for 40 samples"
    elif name == "no_label":
        labels = labels.rename(columns={"label": "class"})
        expected = "labels.csv column=label row=- check=required"
    elif name == "empty_label":
        labels.loc[5, "label"] = None
        expected = "labels.csv column=label row=5 check=not_null"
    elif name == "bad_split":
        labels["split"] = ["train"] * 39 + ["training"]
        expected = "labels.csv column=split row=39 check=isin: 'training'"
    elif name == "strings":
        x = np.array([["a"] * 3] * 40)
        expected = "x.npy column=- row=- check=dtype"
    elif name == "empty_class_in_a_split":
        labels["split"] = ["train"] * 20 + ["val"] * 10 + ["test"] * 10
        labels["label"] = ["c0", "c1"] * 10 + ["c0"] * 10 + ["c0", "c1"] * 5
        # named in the user's table and its split column, not in the manifest it would write
        expected = "labels.csv column=split row=- check=class_in_val: class 'c1' has no val row"
    elif name == "lengths":
        labels["length"] = 2
        expected = (
            "labels.csv column=length row=20 check=frames: lengths sum to 80 over 40 rows, "
            "the array has 40 frames: row 20 (length 2) would span frames 40..42"
        )
    elif name == "duplicate_id":
        labels["id"] = [f"s{i}" for i in range(39)] + ["s0"]
        expected = "labels.csv column=id row=39 check=unique: 's0'"
    np.save(tmp_path / "x.npy", x)
    labels.to_csv(tmp_path / "labels.csv", index=False)
    if name == "truncated":
        (tmp_path / "x.npy").write_bytes((tmp_path / "x.npy").read_bytes()[:200])
        expected = "x.npy column=- row=- check=readable"
    if name == "pickled":
        np.save(tmp_path / "x.npy", np.array([{"a": 1}] * 40, dtype=object), allow_pickle=True)
        expected = "x.npy column=- row=- check=readable"
    return tmp_path / "x.npy", tmp_path / "labels.csv", expected


CASES = [
    "nan",
    "rows",
    "no_label",
    "empty_label",
    "bad_split",
    "strings",
    "lengths",
    "duplicate_id",
    "empty_class_in_a_split",
    "truncated",
    "pickled",
]


@pytest.mark.parametrize("name", CASES)
def test_bad_input_is_refused_with_its_place_and_leaves_nothing(tmp_path, name):
    arrays, labels, expected = _case(tmp_path, name)
    with pytest.raises(DataContractError) as info:
        import_arrays(arrays, labels, tmp_path / "out", name="t", modality="m")
    assert expected in str(info.value)
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.csv", "x.npy"]


def test_cli_import_exits_2_and_never_overwrites(tmp_path, capsys):
    np.save(tmp_path / "x.npy", RNG.normal(size=(40, 3)).astype(np.float32))
    _labels(40).to_csv(tmp_path / "labels.csv", index=False)
    argv = ["import", "arrays", str(tmp_path / "x.npy"), str(tmp_path / "labels.csv")]
    argv += [str(tmp_path / "ds"), "--name", "t", "--modality", "vector"]
    assert main(argv) == 0
    manifest = (tmp_path / "ds" / "manifest.csv").read_bytes()
    assert main(argv) == 2
    assert "exists already" in capsys.readouterr().err
    assert (tmp_path / "ds" / "manifest.csv").read_bytes() == manifest


def _tone(freq: float, seconds: float, rate: int, seed: int) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    noise = np.random.default_rng(seed).normal(scale=0.05, size=t.shape)
    return 0.5 * np.sin(2 * np.pi * freq * t) + noise


@pytest.fixture()
def wav_folder(tmp_path):
    """24 clips of three tones: int16 at 16 kHz, some at 8 kHz, one stereo, one float32."""
    from scipy.io import wavfile

    folder = tmp_path / "clips"
    folder.mkdir()
    rows = []
    for i in range(24):
        label, freq = [("low", 300), ("mid", 700), ("high", 1500)][i % 3]
        rate = 8000 if i % 5 == 0 else 16000
        audio = _tone(freq, 0.3 + 0.01 * i, rate, i)
        if i == 7:
            data = np.stack([audio, audio], 1)
            data = (data * 32767).astype(np.int16)
        elif i == 8:
            data = audio.astype(np.float32)
        else:
            data = (audio * 32767).astype(np.int16)
        wavfile.write(folder / f"c{i:02d}.wav", rate, data)
        rows.append({"file": f"c{i:02d}.wav", "label": label})
    pd.DataFrame(rows).to_csv(tmp_path / "labels.csv", index=False)
    return folder


def test_wav_folder_becomes_frames_with_its_front_end_recorded(tmp_path, wav_folder):
    from cmkd_core.data.importers import import_wav
    from cmkd_core.frontend import AudioFrontEnd

    front = AudioFrontEnd(sample_rate=16000, features="logmel", n_mels=40)
    ds = check_dataset(
        import_wav(
            wav_folder, tmp_path / "labels.csv", tmp_path / "ds", name="tones", front_end=front
        )
    )
    assert ds.meta.kind == "sequence" and ds.meta.sample_shape == (40,)
    assert ds.meta.extra["front_end"] == front.to_json()
    # 25 ms windows every 10 ms at 16 kHz: 1 + (n - 400) // 160 frames for n samples.
    n = int((0.3 + 0.01 * 1) * 16000)
    assert ds.manifest["length"].iloc[1] == 1 + (n - 400) // 160
    # The features mean something: the loudest mel band rises with the tone's pitch.
    peak = {}
    for label in ("low", "mid", "high"):
        rows = ds.manifest[ds.manifest["label"] == label]
        peak[label] = np.mean([clip.mean(0).argmax() for clip in ds.each_sample(rows)])
    assert peak["low"] < peak["mid"] < peak["high"]


def test_bad_wav_files_are_named_and_leave_nothing(tmp_path, wav_folder):
    from cmkd_core.data.importers import import_wav
    from cmkd_core.frontend import AudioFrontEnd

    def run():
        return import_wav(
            wav_folder,
            tmp_path / "labels.csv",
            tmp_path / "ds",
            name="t",
            front_end=AudioFrontEnd(),
        )

    (wav_folder / "c05.wav").write_bytes(b"RIFF....WAVEfmt garbage")
    with pytest.raises(DataContractError, match=r"c05.wav column=- row=5 check=wav"):
        run()
    (wav_folder / "c05.wav").unlink()
    with pytest.raises(DataContractError, match=r"labels.csv column=file row=5 check=exists"):
        run()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clips", "labels.csv"]


def test_image_folder_becomes_grey_arrays_and_wrong_modes_are_refused(tmp_path):
    from PIL import Image

    from cmkd_core.data.importers import import_images
    from cmkd_core.frontend import ImageFrontEnd, front_end_from_json

    folder = tmp_path / "images"
    folder.mkdir()
    rows = []
    modes = ["L", "RGB", "RGBA", "P"]
    for i in range(24):
        pixels = np.zeros((40, 30), np.uint8)
        pixels[:, (i % 3) * 10 : (i % 3) * 10 + 10] = 255  # a bar whose place is the class
        image = Image.fromarray(pixels).convert(modes[i % 4])
        image.save(folder / f"im{i:02d}.png")
        rows.append({"file": f"im{i:02d}.png", "label": f"bar{i % 3}"})
    pd.DataFrame(rows).to_csv(tmp_path / "labels.csv", index=False)
    front = ImageFrontEnd(height=12, width=9)
    ds = check_dataset(
        import_images(
            folder, tmp_path / "labels.csv", tmp_path / "ds", name="bars", front_end=front
        )
    )
    assert ds.meta.sample_shape == (12, 9) and ds.meta.extra["front_end"] == front.to_json()
    x = ds.fixed_arrays(ds.manifest)
    assert x.min() >= 0 and x.max() <= 1
    assert np.allclose(x[0][:, :2], 1, atol=0.05) and np.allclose(x[0][:, 5:], 0, atol=0.05)
    assert front_end_from_json(front.to_json()) == front

    Image.new("CMYK", (30, 40)).save(folder / "im05.jpg")
    rows[5]["file"] = "im05.jpg"
    (folder / "im06.png").write_bytes(b"\x89PNG broken")
    pd.DataFrame(rows).to_csv(tmp_path / "labels.csv", index=False)
    with pytest.raises(DataContractError, match=r"im05.jpg column=- row=5 check=image: .*'CMYK'"):
        import_images(folder, tmp_path / "labels.csv", tmp_path / "b", name="b", front_end=front)
    rows[5]["file"] = "im04.png"
    pd.DataFrame(rows).to_csv(tmp_path / "labels.csv", index=False)
    with pytest.raises(DataContractError, match=r"im06.png column=- row=6 check=image: .*readable"):
        import_images(folder, tmp_path / "labels.csv", tmp_path / "b", name="b", front_end=front)
    assert not (tmp_path / "b").exists()


def test_an_image_declaring_more_pixels_than_the_cap_is_refused_before_decoding(tmp_path):
    """A few kilobytes of PNG can declare a huge image (a decompression bomb): the header is
    checked against MAX_PIXELS before a pixel is decoded."""
    import io

    from PIL import Image

    from cmkd_core.frontend import MAX_PIXELS, ImageError, ImageFrontEnd

    side = 5000  # 25 M pixels > MAX_PIXELS (16.8 M)
    buffer = io.BytesIO()
    Image.new("L", (side, side)).save(buffer, "PNG")
    bomb = buffer.getvalue()
    assert len(bomb) < 100_000 and side * side > MAX_PIXELS
    with pytest.raises(ImageError, match=r"bomb.png: 5000 x 5000 pixels > 16777216"):
        ImageFrontEnd()(bomb, "bomb.png")
