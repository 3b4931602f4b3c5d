"""Is an input like the training data? A distance on each sample's feature statistics, in
numpy only (``cmkd predict`` and ``cmkd serve`` run without torch).

A sample is summarised by the mean and the log standard deviation of each feature over its
frames (a sequence ``(T, F)``; a fixed sample is read as rows of its last axis) and, for
sequences, ``log T``. The log makes a sample that hardly changes over time (a tone, a hum,
silence) as far out as one that changes far too much. The export stage fits the train split's
summaries: their mean, spread and correlations. A sample's distance is the Mahalanobis
distance of its summary, divided by the square root of the number of statistics (so a typical
training clip is near 1), and a sample is **unusual** when its distance passes the largest
distance of any train or validation sample. The model card records the fit, the threshold
and the share of test samples it flags.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

FLOOR = 1e-3  # added to each standard deviation before its log
SHRINK = 1e-3  # added to the diagonal of the standardised covariance before it is inverted


def summary(sample: np.ndarray, sequence: bool) -> np.ndarray:
    """The statistics ``(2F,)`` (``(2F + 1,)`` for a ``sequence``) of one ``sample``: the mean
    and ``log(std + FLOOR)`` of each of its ``F`` features over its frames, then ``log T``."""
    frames = np.asarray(sample, dtype=np.float64).reshape(-1, np.shape(sample)[-1])
    parts = [frames.mean(0), np.log(frames.std(0) + FLOOR)]
    if sequence:
        parts.append([np.log(len(frames))])
    return np.concatenate(parts)


def fit(train: np.ndarray, held_out: np.ndarray, test: np.ndarray) -> dict:
    """The check fitted on the train summaries ``train (n, D)``; its threshold is the largest
    distance of ``train`` and ``held_out (m, D)`` (the validation split); ``test (k, D)`` only
    measures the false-alarm rate. JSON-ready."""
    mean, spread = train.mean(0), train.std(0)
    used = spread > 1e-6 * max(float(spread.max()), 1e-12)  # constant statistics carry nothing
    z = (train[:, used] - mean[used]) / spread[used]
    covariance = np.atleast_2d(np.cov(z.T, bias=True))
    precision = np.linalg.inv(covariance + SHRINK * np.eye(len(covariance)))
    check = {
        "statistics": "mean and log(std + 1e-3) of each feature over frames; log frames",
        "mean": mean.tolist(),
        "spread": spread.tolist(),
        "used": used.tolist(),
        "precision": precision.tolist(),
    }
    threshold = float(max(distance(check, train).max(), distance(check, held_out).max()))
    flagged = distance(check, test) > threshold
    return {**check, "threshold": threshold, "test_flagged": float(flagged.mean())}


def distance(check: dict, summaries: np.ndarray) -> np.ndarray:
    """Distances ``(n,)`` of summaries ``(n, D)`` from the training data ``check`` describes."""
    used = np.asarray(check["used"], dtype=bool)
    z = (summaries[:, used] - np.asarray(check["mean"])[used]) / np.asarray(check["spread"])[used]
    squared = np.einsum("ij,jk,ik->i", z, np.asarray(check["precision"]), z)
    return np.sqrt(np.maximum(squared, 0.0) / used.sum())


def unusual(
    check: dict | None, samples: Sequence[np.ndarray], sequence: bool
) -> list[float | None]:
    """Each sample's distance when it passes the threshold of ``check``, else ``None`` (also
    for every sample when there is no check: a model exported before it existed)."""
    if not check or not samples:
        return [None] * len(samples)
    found = distance(check, np.stack([summary(s, sequence) for s in samples]))
    return [float(d) if d > check["threshold"] else None for d in found]
