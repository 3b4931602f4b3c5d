"""ONNX export of a student, and the parity gate against torch.

The exported graph takes raw inputs (standardisation is inside the model) and returns logits.
Sequence students take ``x (batch, time, F)`` float32 and ``lengths (batch,)`` int64, with
batch and time dynamic; fixed-size students take ``x (batch, *sample_shape)``.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from cmkd_core.data.contract import atomic_path
from cmkd_core.data.tensors import Samples
from cmkd_core.distill.train import predict_logits
from cmkd_core.models import Classifier


class ParityError(RuntimeError):
    """onnxruntime and torch disagree on the exported model."""


class _Deployable(torch.nn.Module):
    """Encoder and head only (no projector): what a deployment runs, for fixed-size inputs."""

    def __init__(self, model: Classifier):
        super().__init__()
        self.encoder, self.head = model.encoder, model.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


class _DeployableSequence(_Deployable):
    """The same for sequence inputs ``x (B, T, F)`` with ``lengths (B,)``."""

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.head(self.encoder(x, lengths))


def input_names(samples: Samples) -> list[str]:
    """ONNX input names for ``samples``' layout: ``["x"]`` or ``["x", "lengths"]``."""
    return ["x", "lengths"] if samples.is_sequence else ["x"]


def export_onnx(model: Classifier, example: Samples, path: str | Path, opset: int = 18) -> Path:
    """Export ``model`` to one self-contained ONNX file (weights inside) and check it.

    ``example`` supplies example inputs (its first few samples); the batch axis, and for
    sequences the time axis, are dynamic. The file is written atomically.
    """
    model = model.cpu().eval()
    inputs, _ = example.to("cpu").take(torch.arange(min(4, len(example))))
    batch = torch.export.Dim("batch", min=1, max=65536)
    shapes: dict[str, dict[int, object]] = {"x": {0: batch}}
    if example.is_sequence:
        shapes["x"][1] = torch.export.Dim("time", min=2, max=4096)
        shapes["lengths"] = {0: batch}
    with atomic_path(path) as tmp, warnings.catch_warnings():
        # Known-harmless exporter chatter: a deprecation inside torch and a note that the
        # batch dimension of ``lengths`` shares the name of ``x``'s.
        warnings.filterwarnings("ignore", message=r".*LeafSpec.*is deprecated")
        warnings.filterwarnings("ignore", message=r".*The axis name: batch will not be used")
        logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
        program = torch.onnx.export(
            (_DeployableSequence if example.is_sequence else _Deployable)(model).eval(),
            inputs,
            input_names=input_names(example),
            output_names=["logits"],
            dynamic_shapes=shapes,
            opset_version=opset,
            dynamo=True,
            external_data=False,
            verbose=False,
        )
        program.save(str(tmp), external_data=False)
        proto = onnx.load(str(tmp))
        _drop_stack_traces(proto)
        onnx.save(proto, str(tmp))
        onnx.checker.check_model(str(tmp), full_check=True)
    return Path(path)


def _drop_stack_traces(proto: onnx.ModelProto) -> None:
    """Remove the exporter's per-node Python stack traces: they name this checkout's absolute
    paths, so the same student exported from two folders would give two different files."""
    graphs = [proto.graph, *proto.functions]
    while graphs:
        graph = graphs.pop()
        for node in graph.node:
            kept = [p for p in node.metadata_props if p.key != "pkg.torch.onnx.stack_trace"]
            del node.metadata_props[:]
            node.metadata_props.extend(kept)
            graphs += [a.g for a in node.attribute if a.HasField("g")]


def onnx_logits(
    session: ort.InferenceSession, samples: Samples, batch_size: int = 256
) -> np.ndarray:
    """Logits ``(N, C)`` from an onnxruntime session over ``samples``, batch by batch."""
    samples = samples.to("cpu")
    names = [i.name for i in session.get_inputs()]
    out = []
    for index in samples.batches(batch_size):
        inputs, _ = samples.take(index)
        feed = {name: t.numpy() for name, t in zip(names, inputs, strict=True)}
        out.append(session.run(["logits"], feed)[0])
    return np.concatenate(out)


@dataclass(frozen=True)
class Parity:
    """Agreement of onnxruntime with torch on a set of samples."""

    n: int
    max_abs_diff: float
    same_predictions: bool
    onnx_accuracy: float


def check_parity(
    model: Classifier, path: str | Path, samples: Samples, atol: float = 1e-4
) -> Parity:
    """Run the ONNX file with onnxruntime on ``samples`` and compare with torch.

    Raises :class:`ParityError` if a logit differs by more than ``atol`` or a predicted class
    differs; returns the measured agreement otherwise.
    """
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = onnx_logits(session, samples)
    want = predict_logits(model.cpu(), samples.to("cpu")).numpy()
    diff = float(np.abs(got - want).max())
    same = bool((got.argmax(1) == want.argmax(1)).all())
    if diff > atol or not same:
        raise ParityError(
            f"{path}: onnxruntime differs from torch on {len(samples)} samples: max |logit diff| "
            f"{diff:.3g} (atol {atol:g}), same predicted classes: {same}"
        )
    accuracy = float((got.argmax(1) == samples.labels.cpu().numpy()).mean())
    return Parity(len(samples), diff, same, accuracy)


# Dynamic int8 quantisation pays on the CPU only for matrix products: measured here, it made
# the students' 1-D convolutions about 2x slower at batch 1 and 64 (bench/serve.py).
INT8_OPS = ("MatMul", "Gemm")


def quantize_int8(source: str | Path, path: str | Path) -> Path:
    """Write ``source`` with dynamic int8 weights for :data:`INT8_OPS` to ``path`` (atomic)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()  # the quantiser logs a pre-processing hint on the root logger
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with atomic_path(path) as tmp:
            quantize_dynamic(
                str(source),
                str(tmp),
                op_types_to_quantize=list(INT8_OPS),
                weight_type=QuantType.QInt8,
            )
            onnx.checker.check_model(str(tmp), full_check=True)
    finally:
        root.setLevel(level)
    return Path(path)


def onnx_accuracy(path: str | Path, samples: Samples) -> float:
    """Share of ``samples`` the ONNX model at ``path`` classifies right (onnxruntime)."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    predicted = onnx_logits(session, samples).argmax(1)
    return float((predicted == samples.labels.cpu().numpy()).mean())
