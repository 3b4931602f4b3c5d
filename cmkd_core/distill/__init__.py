"""The one training loop, the distillation objective and the training recipes."""

from cmkd_core.distill.loop import BestCheckpoint, Callback, ProgressBar, fit, warmup_cosine
from cmkd_core.distill.objective import METHODS, DistillObjective, objective_for
from cmkd_core.distill.train import (
    TrainResult,
    TrainSettings,
    extract_bank,
    predict_features,
    predict_logits,
    resolve_device,
    seed_everything,
    train_classifier,
)

__all__ = [
    "METHODS",
    "BestCheckpoint",
    "Callback",
    "DistillObjective",
    "ProgressBar",
    "TrainResult",
    "TrainSettings",
    "extract_bank",
    "fit",
    "objective_for",
    "predict_features",
    "predict_logits",
    "resolve_device",
    "seed_everything",
    "train_classifier",
    "warmup_cosine",
]
