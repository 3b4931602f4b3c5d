"""Alignment losses between student and teacher: feature (OT) and label alignment."""

from cmkd_core.align.assign import balanced_assignment
from cmkd_core.align.feature import (
    COSTS,
    FeatureAligner,
    cost_matrix,
    feature_alignment,
    transport_plan,
)
from cmkd_core.align.label import label_alignment

__all__ = [
    "COSTS",
    "FeatureAligner",
    "balanced_assignment",
    "cost_matrix",
    "feature_alignment",
    "label_alignment",
    "transport_plan",
]
