"""Deploying an exported student: onnxruntime inference and its HTTP server, without torch."""

from cmkd_core.deploy.runtime import (
    InputError,
    Limits,
    ModelError,
    OnnxStudent,
    Prediction,
    read_inputs,
)

__all__ = ["InputError", "Limits", "ModelError", "OnnxStudent", "Prediction", "read_inputs"]
