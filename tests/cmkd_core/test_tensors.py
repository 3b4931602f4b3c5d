"""Sequences are held unpadded and padded per batch: one long clip costs its own frames, not the
whole split padded to its length; the dataset's array is used in place when it can be."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from cmkd_core.data.contract import DatasetMeta, ModalityDataset
from cmkd_core.data.tensors import PADDED_FRAMES, Samples, samples_of, training_frames

F = 4


def _clips(long_at: int | None = 7) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    lengths = [int(n) for n in rng.integers(5, 21, 40)]
    if long_at is not None:
        lengths[long_at] = 2000  # 100x the typical clip
    return [rng.standard_normal((n, F)).astype(np.float32) for n in lengths]


def _dataset(clips: list[np.ndarray], files: int) -> ModalityDataset:
    """The clips in ``files`` array files, every other clip in the train split."""
    rows, arrays = [], {f"f{k}.npy": [] for k in range(files)}
    for i, clip in enumerate(clips):
        name = f"f{(i // 2) % files}.npy"  # train rows too alternate between files
        offset = sum(len(c) for c in arrays[name])
        arrays[name].append(clip)
        split = "train" if i % 2 == 0 else "val"
        rows.append((str(i), str(i % 3), split, name, offset, len(clip)))
    columns = ["id", "label", "split", "file", "offset", "length"]
    meta = DatasetMeta("toy", "audio", "sequence", (F,), ("0", "1", "2"))
    joined = {name: np.concatenate(parts) for name, parts in arrays.items()}
    return ModalityDataset(Path("<toy>"), meta, pd.DataFrame(rows, columns=columns), joined)


@pytest.mark.parametrize("files", [1, 2])
def test_one_clip_100x_longer_costs_its_frames_not_the_split_padded(files):
    clips = _clips()
    dataset = _dataset(clips, files)
    rows = dataset.rows("train")
    samples = samples_of(dataset, rows)
    frames = samples.inputs[0]
    mine = sum(len(clips[i]) for i in range(0, 40, 2))
    if files == 1:  # the array itself, memory-mapped or not: nothing copied
        assert np.shares_memory(frames.numpy(), dataset.arrays["f0.npy"])
    else:  # only this split's frames, once
        assert frames.shape == (mine, F)
    assert len(training_frames(samples)) == mine
    short = torch.tensor([0, 1, 2, 4, 5])  # clips 0, 2, 4, 8, 10: the long one (7) is not here
    (x, lengths), labels = samples.take(short)
    assert x.shape == (5, int(lengths.max()), F) and int(lengths.max()) <= 20
    for row, clip in zip(x, (clips[2 * int(i)] for i in short), strict=True):
        assert torch.equal(row[: len(clip)], torch.from_numpy(clip))
        assert not row[len(clip) :].any()  # zero padding
    assert labels.tolist() == [int(rows["label"].iloc[int(i)]) for i in short]


def test_a_batch_with_the_long_clip_is_padded_to_it_alone():
    clips = _clips(long_at=6)
    samples = samples_of(_dataset(clips, 1), _dataset(clips, 1).rows("train"))
    (x, lengths), _ = samples.take(torch.tensor([3, 0]))  # clip 6 is train row 3
    assert x.shape == (2, 2000, F) and lengths.tolist() == [2000, len(clips[0])]
    assert torch.equal(x[0], torch.from_numpy(clips[6]))


def test_padded_sequences_give_the_same_batches_as_unpadded_ones():
    clips = _clips(long_at=None)
    dataset = _dataset(clips, 2)
    unpadded = samples_of(dataset, dataset.manifest)
    lengths = torch.tensor([len(c) for c in clips])
    x = torch.zeros(len(clips), int(lengths.max()), F)
    for i, clip in enumerate(clips):
        x[i, : len(clip)] = torch.from_numpy(clip)
    padded = Samples.from_padded(x, lengths, unpadded.labels)
    index = torch.tensor([5, 0, 33, 12])
    for a, b in zip(padded.take(index)[0], unpadded.take(index)[0], strict=True):
        assert torch.equal(a, b)
    assert torch.equal(training_frames(padded), training_frames(unpadded))
    assert padded.kind == "sequence" and Samples((x[:, :, 0],), unpadded.labels).kind == "vector"


def test_prediction_batches_pad_a_far_longer_clip_with_few_others():
    clips = _clips(long_at=30)  # clip 30: 2,000 frames; the others 5 to 20
    samples = samples_of(_dataset(clips, 1), _dataset(clips, 1).manifest)
    batches = [b.tolist() for b in samples.batches(16)]
    assert [i for b in batches for i in b] == list(range(40))  # every sample once, in order
    widths = [len(b) * max(len(clips[i]) for i in b) for b in batches]
    assert max(widths) <= 16 * PADDED_FRAMES
    assert any(len(b) < 16 and 30 in b for b in batches)
    normal = samples_of(_dataset(_clips(None), 1), _dataset(_clips(None), 1).manifest)
    assert [b.tolist() for b in normal.batches(16)] == [
        list(range(s, min(s + 16, 40))) for s in range(0, 40, 16)
    ]
