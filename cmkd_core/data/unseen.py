"""Classes the student has no label for (generalised zero-shot, transductive).

A student dataset may name classes of which no training sample is labelled
(``dataset.json``'s ``extra["unlabelled_classes"]``): their train samples stay in the
unlabelled pool, they keep their validation and test samples, and the teacher bank knows
them. Only the teacher can say where such a class sits; training and model selection never
read a label of one (cmkd_core/recipes.py). ``data.unlabelled_classes`` of params.yaml names
them, or gives how many to draw with the seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import pandas as pd

from cmkd_core.data.contract import UNLABELLED_CLASSES, DatasetMeta


def unlabelled_class_names(
    classes: Sequence[str], spec: Sequence[str] | int, seed: int
) -> tuple[str, ...]:
    """The classes of ``classes`` to leave without labels: ``spec`` names them, or is how many
    to draw (with ``seed``; at least one class keeps its labels). In class order."""
    classes = [str(c) for c in classes]
    if isinstance(spec, int):
        if not 0 <= spec < len(classes):
            raise ValueError(
                f"data.unlabelled_classes: {spec} of {len(classes)} classes; at least one "
                "class must keep its labels"
            )
        drawn = np.random.default_rng(seed + 7).permutation(len(classes))[:spec]
        return tuple(classes[i] for i in sorted(drawn))
    names = [str(c) for c in spec]
    unknown = [c for c in names if c not in classes]
    if unknown:
        raise ValueError(
            f"data.unlabelled_classes: {unknown[0]!r} is not a class; classes: {', '.join(classes)}"
        )
    if len(set(names)) >= len(classes):
        raise ValueError("data.unlabelled_classes: at least one class must keep its labels")
    return tuple(c for c in classes if c in names)


def without_labels_of(
    labelled: Sequence[str], labels: dict[str, str], names: Sequence[str]
) -> list[str]:
    """The ids of ``labelled`` whose class (``labels[id]``) is not one of ``names``."""
    hidden = set(names)
    return [i for i in labelled if labels[i] not in hidden]


def withhold(
    meta: DatasetMeta,
    manifest: pd.DataFrame,
    labelled: Sequence[str],
    spec: Sequence[str] | int,
    seed: int,
) -> tuple[DatasetMeta, list[str]]:
    """``meta`` and the labelled ids with the classes of ``spec`` left without labels (and
    recorded in ``meta.extra``); unchanged when ``spec`` names none."""
    if not spec:
        return meta, list(labelled)
    names = unlabelled_class_names(meta.classes, spec, seed)
    labels = dict(zip(manifest["id"], manifest["label"].astype(str), strict=True))
    meta = replace(meta, extra={**meta.extra, UNLABELLED_CLASSES: list(names)})
    return meta, without_labels_of(labelled, labels, names)
