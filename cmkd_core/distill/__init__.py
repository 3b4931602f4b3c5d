"""The one training loop, the distillation objective and the training recipes."""

from cmkd_core.distill.loop import BestCheckpoint, Callback, ProgressBar, fit, warmup_cosine
from cmkd_core.distill.methods import (
    Batch,
    Method,
    MethodError,
    create_method,
    list_methods,
)
from cmkd_core.distill.train import (
    TrainResult,
    TrainSettings,
    accuracy_of,
    extract_bank,
    predict_features,
    predict_logits,
    resolve_device,
    seed_everything,
    train_classifier,
)

__all__ = [
    "Batch",
    "BestCheckpoint",
    "Callback",
    "Method",
    "MethodError",
    "ProgressBar",
    "TrainResult",
    "TrainSettings",
    "accuracy_of",
    "create_method",
    "extract_bank",
    "fit",
    "list_methods",
    "predict_features",
    "predict_logits",
    "resolve_device",
    "seed_everything",
    "train_classifier",
    "warmup_cosine",
]
