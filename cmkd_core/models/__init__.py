"""Encoders, the classifier around them, and the model registry."""

from cmkd_core.models.encoders import Classifier, ImageCNN, SequenceCNN, Standardize
from cmkd_core.models.registry import create_model, list_models, register_model

__all__ = [
    "Classifier",
    "ImageCNN",
    "SequenceCNN",
    "Standardize",
    "create_model",
    "list_models",
    "register_model",
]
