"""Save and load classifiers as safetensors plus the arguments that rebuild them (no pickle)."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open

from cmkd_core.models.encoders import Classifier
from cmkd_core.models.registry import create_model
from cmkd_core.tensorfile import save_tensors


class CheckpointError(ValueError):
    """A checkpoint file is unreadable or does not fit the architecture it names."""


def build_classifier(spec: dict) -> Classifier:
    """Rebuild an untrained classifier from ``spec`` (model, sample_shape, feature_dim,
    num_classes, align_dim)."""
    encoder = create_model(
        spec["model"], sample_shape=tuple(spec["sample_shape"]), feature_dim=spec["feature_dim"]
    )
    return Classifier(encoder, spec["num_classes"], spec.get("align_dim"))


def save_classifier(
    model: Classifier, spec: dict, path: str | Path, info: dict | None = None
) -> None:
    """Write weights (safetensors) with ``spec`` and ``info`` in the metadata, atomically."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    metadata = {"spec": json.dumps(spec), "info": json.dumps(info or {})}
    save_tensors(tensors, path, metadata)


def load_classifier(path: str | Path) -> tuple[Classifier, dict, dict]:
    """Return ``(model, spec, info)`` from a file written by :func:`save_classifier`."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
            tensors = {key: fh.get_tensor(key) for key in fh.keys()}  # noqa: SIM118
        spec = json.loads(metadata["spec"])
        info = json.loads(metadata.get("info", "{}"))
        model = build_classifier(spec)
        model.load_state_dict(tensors, strict=True)
    except Exception as exc:  # safetensors, json and torch each raise their own types
        raise CheckpointError(f"{path}: cannot load classifier: {exc}") from None
    return model.eval(), spec, info
