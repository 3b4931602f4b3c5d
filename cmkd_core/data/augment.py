"""Weak and strong views of a batch of student inputs, one recipe per kind of modality.

Semi-supervised methods label an unlabelled sample from its *weak* view and learn from its
*strong* view; the weak view may also augment labelled batches (``distill.augment``). Every
view is drawn from the ``torch.Generator`` it is given, so a seeded run is reproducible. The
inputs are raw (the encoders standardise inside the model), so noise is scaled by the train
split's per-feature standard deviation and masked values are set to its mean, which is zero
after standardisation.

Recipes (``level`` is ``"weak"`` or ``"strong"``):

* sequences ``(x (B, T, F), lengths (B,))``: a random crop of each clip to 90-100 % (weak) or
  70-100 % (strong) of its frames, Gaussian noise of 0.1 (0.3) std; strong adds two time masks
  of up to 15 % of the clip each and one mask over up to 3 coefficients;
* images ``x (B, H, W)``: a random shift of up to ``max(1, H // 8)`` pixels (``H // 4`` strong,
  edges repeated) and noise of 0.1 (0.3) std; strong adds one square cut-out of side ``H // 3``;
* vectors ``x (B, ...)``: noise of 0.1 (0.3) std; strong also sets 20 % of the values to the mean.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

Inputs = tuple[torch.Tensor, ...]
Augment = Callable[[Inputs, torch.Generator], Inputs]
KINDS = ("sequence", "image", "vector")
LEVELS = ("weak", "strong")


def _rand(shape: tuple[int, ...], gen: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    return torch.rand(shape, generator=gen).to(like.device)


def _noise(x: torch.Tensor, std: torch.Tensor, scale: float, gen: torch.Generator) -> torch.Tensor:
    return x + torch.randn(x.shape, generator=gen).to(x.device, x.dtype) * (scale * std)


def crop_sequences(
    x: torch.Tensor, lengths: torch.Tensor, low: float, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """A random window of each clip: ``x (B, T, F)``, ``lengths (B,)`` -> the same shapes
    trimmed to the longest window, each clip keeping a share in ``[low, 1]`` of its frames
    (at least 2)."""
    share = low + (1.0 - low) * _rand((len(lengths),), gen, x)
    new = torch.clamp((lengths.to(share.dtype) * share).floor().long(), min=2)
    new = torch.minimum(new, lengths)
    start = ((lengths - new).to(share.dtype) * _rand((len(lengths),), gen, x)).floor().long()
    steps = torch.arange(int(new.max()), device=x.device)
    index = (start[:, None] + steps[None, :]).clamp_max(x.shape[1] - 1)
    window = torch.gather(x, 1, index[:, :, None].expand(-1, -1, x.shape[2]))
    return window, new


def _time_masks(
    x: torch.Tensor, lengths: torch.Tensor, mean: torch.Tensor, gen: torch.Generator
) -> torch.Tensor:
    steps = torch.arange(x.shape[1], device=x.device)[None, :]
    masked = torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device)
    for _ in range(2):
        width = (0.15 * lengths.to(torch.float32) * _rand((len(x),), gen, x)).long()
        start = ((lengths - width).to(torch.float32) * _rand((len(x),), gen, x)).long()
        masked |= (steps >= start[:, None]) & (steps < (start + width)[:, None])
    return torch.where(masked[:, :, None], mean.to(x.dtype), x)


def _feature_mask(x: torch.Tensor, mean: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    features = torch.arange(x.shape[-1], device=x.device)[None, :]
    width = (4 * _rand((len(x),), gen, x)).long().clamp_max(3)  # 0 to 3 coefficients
    start = ((x.shape[-1] - width).to(torch.float32) * _rand((len(x),), gen, x)).long()
    hit = (features >= start[:, None]) & (features < (start + width)[:, None])  # (B, F)
    return torch.where(hit[:, None, :], mean.to(x.dtype), x)


def _shift_images(x: torch.Tensor, most: int, gen: torch.Generator) -> torch.Tensor:
    b, h, w = x.shape
    dy = (_rand((b,), gen, x) * (2 * most + 1)).long() - most
    dx = (_rand((b,), gen, x) * (2 * most + 1)).long() - most
    rows = (torch.arange(h, device=x.device)[None, :] + dy[:, None]).clamp(0, h - 1)  # (B, H)
    cols = (torch.arange(w, device=x.device)[None, :] + dx[:, None]).clamp(0, w - 1)  # (B, W)
    x = torch.gather(x, 1, rows[:, :, None].expand(-1, -1, w))
    return torch.gather(x, 2, cols[:, None, :].expand(-1, h, -1))


def _cutout(x: torch.Tensor, side: int, mean: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    b, h, w = x.shape
    top = (_rand((b,), gen, x) * (h - side + 1)).long()
    left = (_rand((b,), gen, x) * (w - side + 1)).long()
    r = torch.arange(h, device=x.device)[None, :, None]
    c = torch.arange(w, device=x.device)[None, None, :]
    hit = (r >= top[:, None, None]) & (r < (top + side)[:, None, None])
    hit = hit & (c >= left[:, None, None]) & (c < (left + side)[:, None, None])
    return torch.where(hit, mean.to(x.dtype), x)


def make_view(kind: str, level: str, mean: torch.Tensor, std: torch.Tensor) -> Augment:
    """The ``level`` view (module docstring) for inputs of ``kind``; ``mean`` and ``std`` are
    the train split's input statistics, shaped to broadcast against one frame or value
    (``(F,)`` for sequences, ``(1,)`` for images and vectors). Unknown names raise with the
    valid ones."""
    if kind not in KINDS:
        raise ValueError(f"unknown input kind {kind!r}; valid: {', '.join(KINDS)}")
    if level not in LEVELS:
        raise ValueError(f"unknown view {level!r}; valid: {', '.join(LEVELS)}")
    strong = level == "strong"
    noise = 0.3 if strong else 0.1

    def sequence(inputs: Inputs, gen: torch.Generator) -> Inputs:
        x, lengths = inputs
        x, lengths = crop_sequences(x, lengths, 0.7 if strong else 0.9, gen)
        x = _noise(x, std.to(x.device), noise, gen)
        if strong:
            x = _time_masks(x, lengths, mean.to(x.device), gen)
            x = _feature_mask(x, mean.to(x.device), gen)
        return x, lengths

    def image(inputs: Inputs, gen: torch.Generator) -> Inputs:
        x = inputs[0]
        h = x.shape[1]
        x = _shift_images(x, max(1, h // (4 if strong else 8)), gen)
        x = _noise(x, std.to(x.device), noise, gen)
        if strong:
            x = _cutout(x, max(1, h // 3), mean.to(x.device), gen)
        return (x, *inputs[1:])

    def vector(inputs: Inputs, gen: torch.Generator) -> Inputs:
        x = _noise(inputs[0], std.to(inputs[0].device), noise, gen)
        if strong:
            drop = _rand(tuple(x.shape), gen, x) < 0.2
            x = torch.where(drop, mean.to(x.device, x.dtype), x)
        return (x, *inputs[1:])

    return {"sequence": sequence, "image": image, "vector": vector}[kind]


@dataclass(frozen=True)
class Views:
    """The weak and strong view of one kind of input (see :func:`views_for`)."""

    weak: Augment
    strong: Augment


def input_kind(inputs: Inputs) -> str:
    """``sequence`` for ``(x, lengths)``, ``image`` for ``x (B, H, W)``, else ``vector``."""
    if len(inputs) == 2:
        return "sequence"
    return "image" if inputs[0].ndim == 3 else "vector"


def views_for(kind: str, mean: torch.Tensor, std: torch.Tensor) -> Views:
    """Both views of ``kind`` with the train statistics ``mean``, ``std`` (see
    :func:`make_view`)."""
    return Views(make_view(kind, "weak", mean, std), make_view(kind, "strong", mean, std))


def compose(*augments: Augment | None) -> Augment | None:
    """Apply the given augmentations in order (``None`` entries skipped); ``None`` if none."""
    chain = [a for a in augments if a is not None]
    if not chain:
        return None

    def apply(inputs: Inputs, gen: torch.Generator) -> Inputs:
        for augment in chain:
            inputs = augment(inputs, gen)
        return inputs

    return apply
