"""Robustness presets, applied to the train split only (validation and test stay clean).

Three challenges, as in the authors' experiments:

* ``marginal_mismatch`` (ratio r): the teacher bank keeps only a fraction r of each class's
  train rows, so the class-conditional distributions the student aligns to come from a
  smaller, different pool;
* ``domain_shift`` (level s): each labelled training batch of the student is perturbed with
  Gaussian noise of ``s`` times the per-feature standard deviation and a random gain per sample
  in ``[1 - s/2, 1 + s/2]``;
* ``label_imbalance`` (factor f): the bank's train rows follow a long tail, class ``k`` keeping
  ``f ** (-k / (C - 1))`` of its rows (the first class all, the last ``1/f``).

``clean`` applies none; ``mild``, ``moderate`` and ``hard`` combine all three at
(0.7, 0.3, 5), (0.5, 0.5, 10) and (0.3, 0.8, 50); the single-challenge ablations use the
``moderate`` level of one challenge.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cmkd_core.data.contract import SPLITS


@dataclass(frozen=True)
class Robustness:
    """Levels of the three challenges; ``None`` switches one off."""

    mismatch_ratio: float | None = None
    shift_level: float | None = None
    imbalance_factor: float | None = None


PRESETS: dict[str, Robustness] = {
    "clean": Robustness(),
    "mild": Robustness(0.7, 0.3, 5),
    "moderate": Robustness(0.5, 0.5, 10),
    "hard": Robustness(0.3, 0.8, 50),
    "marginal_mismatch": Robustness(mismatch_ratio=0.5),
    "domain_shift": Robustness(shift_level=0.5),
    "label_imbalance": Robustness(imbalance_factor=10),
}


def preset(name: str) -> Robustness:
    """The levels of preset ``name``; an unknown name lists the valid ones."""
    if name not in PRESETS:
        raise KeyError(f"unknown robustness preset {name!r}; valid: {', '.join(PRESETS)}")
    return PRESETS[name]


def domain_shift(level: float, feature_std: torch.Tensor):
    """An augmentation for :func:`train_classifier`: noise and gain on ``inputs[0]``.

    ``feature_std`` broadcasts against a sample's last axis (e.g. ``(F,)`` for sequences).
    """

    def augment(inputs: tuple[torch.Tensor, ...], generator: torch.Generator):
        x = inputs[0]
        noise = torch.randn(x.shape, generator=generator).to(x.device) * level * feature_std
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        gain = 1.0 + (torch.rand(shape, generator=generator).to(x.device) - 0.5) * level
        return (x * gain + noise, *inputs[1:])

    return augment


__all__ = ["PRESETS", "SPLITS", "Robustness", "domain_shift", "preset"]
