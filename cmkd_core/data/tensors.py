"""Samples of a dataset split as tensors, batched by index."""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from cmkd_core.data.contract import ModalityDataset

PADDED_FRAMES = 512
"""Frames per sample a prediction batch may pad to on average (:meth:`Samples.batches`)."""


@dataclass
class Samples:
    """Model inputs and labels of ``N`` samples.

    ``inputs`` is ``(x,)`` with ``x (N, *sample_shape)`` for fixed-size data. Sequences are
    kept unpadded, ``(frames, starts, lengths)``: ``frames (M, F)`` holds their frames (often
    the dataset's memory-mapped array itself, with other samples' frames between them), sample
    ``i`` is ``frames[starts[i] : starts[i] + lengths[i]]``, ``starts`` and ``lengths`` ``(N,)``
    int64. :meth:`take` pads a batch to its own longest sample, so memory grows with the frames
    there are, not with ``N`` times the longest clip. ``labels`` has shape ``(N,)``, int64
    class indices.
    """

    inputs: tuple[torch.Tensor, ...]
    labels: torch.Tensor
    pair_index: torch.Tensor | None = None
    """``(N,)`` int64 teacher-bank row of each sample's pair (paired data only)."""

    @classmethod
    def from_padded(
        cls,
        x: torch.Tensor,
        lengths: torch.Tensor,
        labels: torch.Tensor,
        pair_index: torch.Tensor | None = None,
    ) -> Samples:
        """Sequences given zero-padded, ``x (N, T, F)`` with ``lengths (N,)``."""
        valid = torch.arange(x.shape[1], device=x.device)[None, :] < lengths[:, None]
        starts = torch.cumsum(lengths, 0) - lengths
        return cls((x[valid], starts, lengths), labels, pair_index)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def is_sequence(self) -> bool:
        return len(self.inputs) == 3

    @property
    def kind(self) -> str:
        """``sequence``, ``image`` (``(N, H, W)``) or ``vector``, as
        :func:`~cmkd_core.data.augment.input_kind` names a batch's inputs."""
        if self.is_sequence:
            return "sequence"
        return "image" if self.inputs[0].ndim == 3 else "vector"

    def take(self, index: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """Inputs and labels of the samples at ``index (b,)``: ``(x (b, *shape),)``, or for
        sequences ``(x (b, T, F), lengths (b,))`` zero-padded to the batch's longest sample."""
        index = index.to(self.labels.device)
        if not self.is_sequence:
            return (self.inputs[0][index],), self.labels[index]
        frames, starts, lengths = self.inputs
        lengths = lengths[index]
        steps = torch.arange(int(lengths.max()), device=frames.device)
        valid = steps[None, :] < lengths[:, None]
        positions = torch.where(valid, starts[index][:, None] + steps[None, :], 0)
        mask = valid.view(*valid.shape, *(1,) * (frames.ndim - 1))
        x = torch.where(mask, frames[positions], 0.0)
        return (x, lengths), self.labels[index]

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """Indices ``(b,)`` of consecutive samples, ``batch_size`` at a time, for passes that
        see every sample once in order (prediction, banks). A batch of sequences is cut short
        where padding it would exceed ``batch_size * PADDED_FRAMES`` frames, so a clip far
        longer than the rest is padded with few others; below that, batches are unchanged."""
        if not self.is_sequence:
            for start in range(0, len(self), batch_size):
                yield torch.arange(start, min(start + batch_size, len(self)))
            return
        budget, start, longest = batch_size * PADDED_FRAMES, 0, 0
        for i, length in enumerate(self.inputs[2].tolist()):
            longest = max(longest, length)
            if i > start and (i - start == batch_size or (i - start + 1) * longest > budget):
                yield torch.arange(start, i)
                start, longest = i, length
        if start < len(self):
            yield torch.arange(start, len(self))

    def subset(self, index: torch.Tensor) -> Samples:
        """The samples at ``index (b,)``, sharing these samples' tensors' storage of frames."""
        index = index.to(self.labels.device)
        pairs = self.pair_index[index] if self.pair_index is not None else None
        if self.is_sequence:
            frames, starts, lengths = self.inputs
            return Samples((frames, starts[index], lengths[index]), self.labels[index], pairs)
        return Samples((self.inputs[0][index],), self.labels[index], pairs)

    def frames(self) -> torch.Tensor:
        """The valid frames of all sequences, sample after sample, ``(sum of lengths, F)``."""
        frames, starts, lengths = self.inputs
        first = torch.repeat_interleave(starts - (torch.cumsum(lengths, 0) - lengths), lengths)
        return frames[first + torch.arange(len(first), device=frames.device)]

    def to(self, device: torch.device | str) -> Samples:
        """These samples on ``device``; sequences moved to another device keep only their
        own frames."""
        pairs = self.pair_index.to(device) if self.pair_index is not None else None
        inputs = self.inputs
        if self.is_sequence and torch.device(device) != inputs[0].device:
            lengths = inputs[2]
            inputs = (self.frames(), torch.cumsum(lengths, 0) - lengths, lengths)
        return Samples(tuple(t.to(device) for t in inputs), self.labels.to(device), pairs)


def samples_of(
    dataset: ModalityDataset, rows: pd.DataFrame, classes: Sequence[str] | None = None
) -> Samples:
    """Tensors for the manifest ``rows`` of ``dataset``; labels index into ``classes``
    (the run's shared class list; defaults to the dataset's own)."""
    index = {c: i for i, c in enumerate(classes if classes is not None else dataset.meta.classes)}
    labels = torch.as_tensor(np.array([index[c] for c in rows["label"]], dtype=np.int64))
    if dataset.meta.kind == "fixed":
        return Samples((torch.from_numpy(dataset.fixed_arrays(rows)),), labels)
    frames, starts, lengths = dataset.sequence_frames(rows)
    with warnings.catch_warnings():  # a read-only memory map: nothing here writes to it
        warnings.filterwarnings("ignore", "The given NumPy array is not writable")
        frames = torch.from_numpy(frames)
    return Samples((frames, torch.from_numpy(starts), torch.from_numpy(lengths)), labels)


def training_frames(samples: Samples) -> torch.Tensor:
    """All valid (unpadded) frames or pixels of ``samples``, flattened to ``(N_values, F)``."""
    if samples.is_sequence:
        return samples.frames()
    x = samples.inputs[0]
    return x.reshape(-1, 1)
