"""Banks from teachers the pipeline did not train: an ONNX model run by onnxruntime.

The ONNX teacher takes the contract's inputs (``x``, and ``lengths`` for sequences) and gives
two named outputs: the features that feed its final linear layer, and the logits. The bank
needs that layer's weights; they are recovered by least squares on the train rows (logits =
features @ W.T + b) and the fit must be exact to float32 precision, or the named feature output
is not what feeds the head and the teacher is refused.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from cmkd_core.bank import BankError, TeacherBank
from cmkd_core.data.contract import SPLITS, ModalityDataset
from cmkd_core.data.tensors import samples_of


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
    samples = samples_of(dataset, dataset.manifest)
    features, logits = [], []
    for start in range(0, len(samples), batch_size):
        batch, _ = samples.take(torch.arange(start, min(start + batch_size, len(samples))))
        feed = {name: t.numpy() for name, t in zip(inputs, batch, strict=True)}
        f, z = session.run([feature_output, logits_output], feed)
        features.append(np.asarray(f, np.float32).reshape(len(f), -1))
        logits.append(np.asarray(z, np.float32))
    f, z = np.concatenate(features), np.concatenate(logits)
    classes = dataset.meta.classes
    if z.shape[1] != len(classes):
        raise BankError(f"{path}: {logits_output!r} has {z.shape[1]} classes, data {len(classes)}")
    splits = np.array([SPLITS.index(s) for s in dataset.manifest["split"]])
    train = splits == SPLITS.index("train")
    design = np.concatenate([f[train], np.ones((train.sum(), 1), np.float32)], 1).astype(np.float64)
    solution, *_ = np.linalg.lstsq(design, z[train].astype(np.float64), rcond=None)
    weight, bias = solution[:-1].T, solution[-1]
    residual = float(np.abs(f @ weight.T + bias - z).max())
    scale = float(np.abs(z).max()) or 1.0
    if residual > 1e-3 * scale:
        raise BankError(
            f"{path}: {logits_output!r} is not a linear function of {feature_output!r} (max "
            f"residual {residual:.3g} of logits up to {scale:.3g}); name the output that feeds "
            "the final linear layer"
        )
    labels = samples.labels.numpy()
    accuracy = {
        split: float((z[splits == i].argmax(1) == labels[splits == i]).mean())
        for i, split in enumerate(SPLITS)
        if split in ("val", "test")
    }
    info = {
        "source": "onnx",
        "file": path.name,
        "dataset": dataset.meta.name,
        "val_accuracy": accuracy["val"],
        "test_accuracy": accuracy["test"],
        "head_fit_max_residual": residual,
    }
    bank = TeacherBank(
        features=torch.from_numpy(f),
        labels=torch.from_numpy(labels),
        splits=torch.from_numpy(splits),
        head_weight=torch.from_numpy(np.ascontiguousarray(weight, dtype=np.float32)),
        head_bias=torch.from_numpy(np.ascontiguousarray(bias, dtype=np.float32)),
        classes=tuple(classes),
        info=info,
        ids=tuple(dataset.manifest["id"]),
    )
    return bank, accuracy
