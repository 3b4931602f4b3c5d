"""Encoders for fixed-size images and variable-length sequences, and the classifier around them.

Every encoder maps its inputs to a feature vector ``(B, feature_dim)`` and carries its input
standardisation as buffers, so an exported model takes raw inputs.
"""

from __future__ import annotations

import torch
from torch import nn

from cmkd_core.models.registry import register_model


class Standardize(nn.Module):
    """``(x - mean) / std`` per last-axis feature; ``mean`` and ``std`` have shape ``(F,)``."""

    def __init__(self, num_features: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(num_features))
        self.register_buffer("std", torch.ones(num_features))

    def fit(self, x: torch.Tensor) -> Standardize:
        """Set the statistics from samples ``x`` of shape ``(N, F)`` (train split only)."""
        self.mean.copy_(x.mean(0))
        self.std.copy_(x.std(0).clamp_min(1e-6))
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class ImageCNN(nn.Module):
    """Small CNN for one-channel images ``x`` of shape ``(B, H, W)`` -> ``(B, feature_dim)``."""

    def __init__(
        self, height: int = 8, width: int = 8, feature_dim: int = 128, width_mult: int = 32
    ):
        super().__init__()
        self.norm = Standardize(1)
        self.conv = nn.Sequential(
            nn.Conv2d(1, width_mult, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width_mult, 2 * width_mult, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        flat = 2 * width_mult * (height // 2) * (width // 2)
        self.proj = nn.Sequential(
            nn.Flatten(), nn.Dropout(0.2), nn.Linear(flat, feature_dim), nn.ReLU()
        )
        self.feature_dim = feature_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x.unsqueeze(-1)).squeeze(-1).unsqueeze(1)
        return self.proj(self.conv(x))


class SequenceCNN(nn.Module):
    """1-D CNN over variable-length frame sequences, masked so padding has no effect.

    Input ``x`` of shape ``(B, T, F)`` (frames past a sample's length may hold anything) and
    ``lengths`` of shape ``(B,)``. Padded frames are zeroed after the input standardisation and
    after every convolution, so each sample's output equals the output for that sample alone,
    unpadded. Pooling is the masked mean over the true length concatenated with the max over
    time (exact under the mask, as activations are non-negative after ReLU and padding is 0).
    Output ``(B, feature_dim)``.
    """

    def __init__(self, in_dim: int = 13, feature_dim: int = 64, hidden: int = 64):
        super().__init__()
        self.norm = Standardize(in_dim)
        self.convs = nn.ModuleList(
            [
                nn.Conv1d(in_dim, hidden, 5, padding=2),
                nn.Conv1d(hidden, hidden, 5, padding=2),
                nn.Conv1d(hidden, hidden, 3, padding=1),
            ]
        )
        self.proj = nn.Sequential(nn.Dropout(0.1), nn.Linear(2 * hidden, feature_dim), nn.ReLU())
        self.feature_dim = feature_dim

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        steps = torch.arange(x.shape[1], device=x.device)
        mask = (steps.unsqueeze(0) < lengths.unsqueeze(1)).unsqueeze(1).to(x.dtype)  # (B, 1, T)
        h = self.norm(x).transpose(1, 2) * mask  # (B, F, T)
        for conv in self.convs:
            h = torch.relu(conv(h)) * mask
        mean = h.sum(-1) / lengths.unsqueeze(1).to(h.dtype)
        return self.proj(torch.cat([mean, h.amax(-1)], dim=1))


class MLP(nn.Module):
    """Two layers over flattened fixed-size samples ``x (B, *sample_shape)`` (vectors such as
    embeddings or sensor features) -> ``(B, feature_dim)``. The input standardisation is one
    mean and std over all values, as for images."""

    def __init__(self, in_dim: int, feature_dim: int = 128, hidden: int = 256):
        super().__init__()
        self.norm = Standardize(1)
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden),
            nn.ReLU(),
            nn.Dropout(0.1),
            nn.Linear(hidden, feature_dim),
            nn.ReLU(),
        )
        self.feature_dim = feature_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.norm(x.flatten(1).unsqueeze(-1)).squeeze(-1))


class Classifier(nn.Module):
    """Encoder plus linear head: ``forward(*inputs)`` gives logits ``(B, num_classes)``.

    ``projector`` maps the encoder's features into another model's feature space for
    alignment; it is used in training only and is not part of :meth:`forward`.
    """

    def __init__(self, encoder: nn.Module, num_classes: int, align_dim: int | None = None):
        super().__init__()
        self.encoder = encoder
        dim = encoder.feature_dim
        self.head = nn.Linear(dim, num_classes)
        self.projector = (
            nn.Linear(dim, align_dim, bias=False)
            if align_dim and align_dim != dim
            else nn.Identity()
        )

    def features(self, *inputs: torch.Tensor) -> torch.Tensor:
        """Encoder features ``(B, feature_dim)``."""
        return self.encoder(*inputs)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(*inputs))


@register_model("image_cnn")
def image_cnn(sample_shape: tuple[int, ...] = (8, 8), feature_dim: int = 128) -> ImageCNN:
    """CNN for fixed-size one-channel images of ``sample_shape == (H, W)``."""
    if len(sample_shape) != 2:
        raise ValueError(f"image_cnn needs sample_shape (H, W), got {sample_shape}")
    return ImageCNN(sample_shape[0], sample_shape[1], feature_dim)


@register_model("sequence_cnn")
def sequence_cnn(sample_shape: tuple[int, ...] = (13,), feature_dim: int = 64) -> SequenceCNN:
    """Masked 1-D CNN for sequences of frames with ``sample_shape == (F,)``."""
    if len(sample_shape) != 1:
        raise ValueError(f"sequence_cnn needs sample_shape (F,), got {sample_shape}")
    return SequenceCNN(sample_shape[0], feature_dim)


@register_model("mlp")
def mlp(sample_shape: tuple[int, ...] = (64,), feature_dim: int = 128) -> MLP:
    """MLP for fixed-size samples of any ``sample_shape`` (flattened)."""
    size = 1
    for d in sample_shape:
        size *= d
    return MLP(size, feature_dim)
