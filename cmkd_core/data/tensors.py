"""Samples of a dataset split as tensors, batched by index."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from cmkd_core.data.contract import ModalityDataset


@dataclass
class Samples:
    """Model inputs and labels of ``N`` samples.

    ``inputs`` is ``(x,)`` with ``x (N, *sample_shape)`` for fixed-size data, or
    ``(x, lengths)`` with ``x (N, T_max, F)`` zero-padded and ``lengths (N,)`` for sequences.
    ``labels`` has shape ``(N,)``, int64 class indices.
    """

    inputs: tuple[torch.Tensor, ...]
    labels: torch.Tensor
    pair_index: torch.Tensor | None = None
    """``(N,)`` int64 teacher-bank row of each sample's pair (paired data only)."""

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def is_sequence(self) -> bool:
        return len(self.inputs) == 2

    def take(self, index: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """Inputs and labels of the samples at ``index (b,)``; sequences are trimmed to the
        longest sample of the batch."""
        index = index.to(self.labels.device)
        inputs = tuple(t[index] for t in self.inputs)
        if self.is_sequence:
            x, lengths = inputs
            inputs = (x[:, : int(lengths.max())], lengths)
        return inputs, self.labels[index]

    def to(self, device: torch.device | str) -> Samples:
        pairs = self.pair_index.to(device) if self.pair_index is not None else None
        return Samples(tuple(t.to(device) for t in self.inputs), self.labels.to(device), pairs)


def samples_of(
    dataset: ModalityDataset, rows: pd.DataFrame, classes: Sequence[str] | None = None
) -> Samples:
    """Tensors for the manifest ``rows`` of ``dataset``; labels index into ``classes``
    (the run's shared class list; defaults to the dataset's own)."""
    index = {c: i for i, c in enumerate(classes if classes is not None else dataset.meta.classes)}
    labels = torch.as_tensor(np.array([index[c] for c in rows["label"]], dtype=np.int64))
    if dataset.meta.kind == "fixed":
        return Samples((torch.from_numpy(dataset.fixed_arrays(rows)),), labels)
    x, lengths = dataset.padded_sequences(rows)
    return Samples((torch.from_numpy(x), torch.from_numpy(lengths)), labels)


def training_frames(samples: Samples) -> torch.Tensor:
    """All valid (unpadded) frames or pixels of ``samples``, flattened to ``(N_values, F)``."""
    if samples.is_sequence:
        x, lengths = samples.inputs
        mask = torch.arange(x.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)
        return x[mask]
    x = samples.inputs[0]
    return x.reshape(-1, 1)
