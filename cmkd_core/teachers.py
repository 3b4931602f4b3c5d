"""Banks from teachers the pipeline did not train: an ONNX model, a torch module named by
import path, or embeddings the user already has plus the head's weights.

Every bank's classes are the teacher dataset's ``classes``, in that order (for imported data
the natural order of :func:`cmkd_core.data.contract.class_order`): a given head's row ``i``
must be the logit of class ``i``.

The ONNX teacher takes the contract's inputs (``x``, and ``lengths`` for sequences) and gives
two named outputs: the features that feed its final linear layer, and the logits. The bank
needs that layer's weights; they are recovered by least squares on the train rows (logits =
features @ W.T + b) and the fit must be exact to float32 precision, or the named feature output
is not what feeds the head and the teacher is refused.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from safetensors.torch import load_file

from cmkd_core.bank import BankError, TeacherBank
from cmkd_core.data.contract import SPLITS, ModalityDataset
from cmkd_core.data.tensors import samples_of


def _bank_from_outputs(
    where: str,
    dataset: ModalityDataset,
    features: np.ndarray,
    logits: np.ndarray | None,
    head: tuple[np.ndarray, np.ndarray] | None,
    info: dict,
    names: tuple[str, str] = ("features", "logits"),
) -> tuple[TeacherBank, dict[str, float]]:
    """The bank from per-sample teacher ``features (N, d)`` and either ``logits (N, C)`` (the
    head is then recovered by least squares on the train rows) or the ``head`` weights."""
    classes = dataset.meta.classes
    if len(features) != len(dataset.manifest):
        raise BankError(
            f"{where}: {len(features)} feature rows for {len(dataset.manifest)} samples"
        )
    if not np.isfinite(features).all():
        raise BankError(f"{where}: {names[0]!r} holds NaN or inf")
    splits = np.array([SPLITS.index(s) for s in dataset.manifest["split"]])
    if head is None:
        if logits.shape[1] != len(classes):
            raise BankError(
                f"{where}: {names[1]!r} has {logits.shape[1]} classes, data {len(classes)}"
            )
        train = splits == SPLITS.index("train")
        design = np.concatenate([features[train], np.ones((train.sum(), 1))], 1)
        solution, *_ = np.linalg.lstsq(design, logits[train].astype(np.float64), rcond=None)
        weight, bias = solution[:-1].T, solution[-1]
        residual = float(np.abs(features @ weight.T + bias - logits).max())
        scale = float(np.abs(logits).max()) or 1.0
        if residual > 1e-3 * scale:
            raise BankError(
                f"{where}: {names[1]!r} is not a linear function of {names[0]!r} (max residual "
                f"{residual:.3g} of logits up to {scale:.3g}); name the output that feeds the "
                "final linear layer"
            )
        info = {**info, "head_fit_max_residual": residual}
    else:
        weight, bias = head
        if weight.shape != (len(classes), features.shape[1]) or bias.shape != (len(classes),):
            raise BankError(
                f"{where}: head weight {weight.shape} and bias {bias.shape} do not fit "
                f"{features.shape[1]}-d features and {len(classes)} classes "
                f"(expected ({len(classes)}, {features.shape[1]}) and ({len(classes)},))"
            )
    labels = samples_labels(dataset)
    predicted = (features @ weight.T + bias).argmax(1)
    accuracy = {
        split: float((predicted[splits == i] == labels[splits == i]).mean())
        for i, split in enumerate(SPLITS)
        if split in ("val", "test")
    }
    bank = TeacherBank(
        features=torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32)),
        labels=torch.from_numpy(labels),
        splits=torch.from_numpy(splits),
        head_weight=torch.from_numpy(np.ascontiguousarray(weight, dtype=np.float32)),
        head_bias=torch.from_numpy(np.ascontiguousarray(bias, dtype=np.float32)),
        classes=tuple(classes),
        info={
            **info,
            "dataset": dataset.meta.name,
            "val_accuracy": accuracy["val"],
            "test_accuracy": accuracy["test"],
        },
        ids=tuple(dataset.manifest["id"]),
    )
    return bank, accuracy


def samples_labels(dataset: ModalityDataset) -> np.ndarray:
    """Class indices ``(N,)`` of every sample, manifest order."""
    return dataset.labels(dataset.manifest)


def _batches(dataset: ModalityDataset, batch_size: int):
    samples = samples_of(dataset, dataset.manifest)
    for index in samples.batches(batch_size):
        yield samples.take(index)[0]


def bank_from_onnx(
    path: str | Path,
    dataset: ModalityDataset,
    feature_output: str = "features",
    logits_output: str = "logits",
    batch_size: int = 256,
) -> tuple[TeacherBank, dict[str, float]]:
    """Run the ONNX teacher at ``path`` over every sample of ``dataset`` (manifest order) and
    return its bank and its accuracy on the val and test splits."""
    path = Path(path)
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own error types
        raise BankError(f"{path}: not a loadable ONNX model: {exc}") from None
    outputs = [o.name for o in session.get_outputs()]
    for name in (feature_output, logits_output):
        if name not in outputs:
            raise BankError(f"{path}: no output named {name!r}; its outputs are {outputs}")
    inputs = [i.name for i in session.get_inputs()]
    expected = ["x", "lengths"] if dataset.meta.kind == "sequence" else ["x"]
    if inputs != expected:
        raise BankError(f"{path}: inputs {inputs}, expected {expected} for {dataset.meta.kind}")
    features, logits = [], []
    for batch in _batches(dataset, batch_size):
        feed = {name: t.numpy() for name, t in zip(inputs, batch, strict=True)}
        f, z = session.run([feature_output, logits_output], feed)
        features.append(np.asarray(f, np.float64).reshape(len(f), -1))
        logits.append(np.asarray(z, np.float64))
    info = {"source": "onnx", "file": path.name}
    return _bank_from_outputs(
        str(path),
        dataset,
        np.concatenate(features),
        np.concatenate(logits),
        None,
        info,
        (feature_output, logits_output),
    )


def bank_from_module(
    target: str,
    weights: str | Path,
    dataset: ModalityDataset,
    kwargs: dict | None = None,
    batch_size: int = 256,
) -> tuple[TeacherBank, dict[str, float]]:
    """A torch teacher named ``package.module:Class`` (built with ``kwargs``), its weights from
    ``weights`` (safetensors, or a checkpoint loaded with ``weights_only=True``); its forward
    returns ``(features, logits)``."""
    module_name, _, class_name = target.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError) as exc:
        raise BankError(f"{target}: cannot import the teacher class: {exc}") from None
    weights = Path(weights)
    try:
        if weights.suffix == ".safetensors":
            state = load_file(str(weights))
        else:
            state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors and torch raise their own types
        raise BankError(f"{weights}: not loadable weights: {exc}") from None
    model = cls(**(kwargs or {}))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise BankError(f"{weights}: do not fit {target}: {exc}") from None
    model.eval()
    features, logits = [], []
    with torch.no_grad():
        for batch in _batches(dataset, batch_size):
            out = model(*batch)
            if not isinstance(out, tuple) or len(out) != 2:
                raise BankError(f"{target}: forward must return (features, logits)")
            features.append(out[0].double().reshape(len(out[0]), -1).numpy())
            logits.append(out[1].double().numpy())
    info = {"source": "torch", "module": target, "file": weights.name}
    return _bank_from_outputs(
        target, dataset, np.concatenate(features), np.concatenate(logits), None, info
    )


def bank_from_embeddings(
    embeddings: str | Path | None, head: str | Path, dataset: ModalityDataset
) -> tuple[TeacherBank, dict[str, float]]:
    """Embeddings the user already has, ``(N, d)`` in manifest order (``.npy``), and the
    teacher head's ``weight (C, d)`` and ``bias (C,)`` (safetensors), whose rows follow
    ``dataset.meta.classes``.

    With ``embeddings`` ``None`` the samples of ``dataset`` are the embeddings: a fixed-size
    dataset of sample shape ``(d,)`` (what ``cmkd import arrays`` writes from an ``(N, d)``
    array and a table of labels and splits), so they are stored once and nothing else about the
    teacher's modality is needed.
    """
    head = Path(head)
    if embeddings is None:
        meta = dataset.meta
        if meta.kind != "fixed" or len(meta.sample_shape) != 1:
            raise BankError(
                f"{dataset.root}: {meta.kind} samples of shape {meta.sample_shape}; to be the "
                "embeddings, the teacher dataset's samples must be fixed-size vectors (d,) "
                "(cmkd import arrays EMBEDDINGS.npy LABELS.csv ...), or name an (N, d) .npy"
            )
        where = str(dataset.root)
        features = dataset.fixed_arrays(dataset.manifest).astype(np.float64)
        file = f"{dataset.root.name} (the teacher dataset's samples)"
    else:
        embeddings = Path(embeddings)
        where, file = str(embeddings), embeddings.name
        try:
            features = np.load(embeddings, allow_pickle=False).astype(np.float64)
        except Exception as exc:  # truncated, corrupt or pickled
            raise BankError(f"{embeddings}: not a readable .npy array: {exc}") from None
        if features.ndim != 2:
            raise BankError(f"{embeddings}: shape {features.shape}, expected (samples, features)")
    try:
        tensors = load_file(str(head))
        weight, bias = tensors["weight"].double().numpy(), tensors["bias"].double().numpy()
    except KeyError as exc:
        raise BankError(f"{head}: missing tensor {exc}; needs 'weight' and 'bias'") from None
    except Exception as exc:
        raise BankError(f"{head}: not a readable safetensors file: {exc}") from None
    info = {"source": "embeddings", "file": file, "head": head.name}
    return _bank_from_outputs(where, dataset, features, None, (weight, bias), info)


HEAD_L2 = (1e-4, 1e-3, 1e-2, 1e-1)
"""The L2 strengths tried for a head fitted on vectors; the best on the val rows is kept."""


def fit_linear_head(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    l2: float,
    steps: int = 200,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression (L-BFGS, float64) with an L2 penalty ``l2`` on the
    weight: ``features`` ``(N, d)``, ``labels`` ``(N,)`` int64. Returns ``weight (C, d)`` and
    ``bias (C,)``, float64. Deterministic: it starts from zero."""
    x = features.double()
    weight = torch.zeros(num_classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS([weight, bias], max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ weight.T + bias, labels)
        loss = loss + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimiser.step(closure)
    return weight.detach(), bias.detach()


def bank_from_vectors(dataset: ModalityDataset) -> tuple[TeacherBank, dict[str, float]]:
    """The bank of a dataset whose samples are already the teacher's features (shape ``(d,)``:
    sentence embeddings of texts, :mod:`cmkd_core.text`): the rows as they are, and a linear
    head fitted on the train rows, its L2 strength chosen from :data:`HEAD_L2` on the val rows
    (ties to the stronger)."""
    meta = dataset.meta
    if meta.kind != "fixed" or len(meta.sample_shape) != 1:
        raise BankError(
            f"{dataset.root}: {meta.kind} samples of shape {meta.sample_shape}; a head can be "
            "fitted only on vectors (d,)"
        )
    features = dataset.fixed_arrays(dataset.manifest).astype(np.float64)
    labels = torch.from_numpy(samples_labels(dataset))
    splits = np.array([SPLITS.index(s) for s in dataset.manifest["split"]])
    train = torch.from_numpy(splits == SPLITS.index("train"))
    val = torch.from_numpy(splits == SPLITS.index("val"))
    x = torch.from_numpy(features)
    best = None
    with torch.enable_grad():
        for l2 in sorted(HEAD_L2, reverse=True):
            weight, bias = fit_linear_head(x[train], labels[train], len(meta.classes), l2)
            score = float(((x[val] @ weight.T + bias).argmax(1) == labels[val]).double().mean())
            if best is None or score > best[0]:
                best = (score, l2, weight, bias)
    _, l2, weight, bias = best
    info = {"source": "text" if meta.modality == "text" else "vectors", "head_l2": l2}
    info.update({k: v for k, v in meta.extra.items() if k in ("text_model", "texts")})
    return _bank_from_outputs(
        str(dataset.root), dataset, features, None, (weight.numpy(), bias.numpy()), info
    )
