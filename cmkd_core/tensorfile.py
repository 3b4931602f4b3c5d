"""Safetensors files whose bytes depend only on their content.

``safetensors`` keeps the metadata in a hash map whose order is seeded per process, so the same
tensors and metadata saved by two processes give files that differ in the order of the
header's metadata keys (and so in their digests, which DVC and the tests compare).
:func:`save_tensors` writes the header with its keys sorted; readers see the same file.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save

from cmkd_core.data.contract import atomic_path


def canonical_bytes(data: bytes) -> bytes:
    """The safetensors ``data`` with its JSON header's keys sorted (at every level), padded
    with spaces to a multiple of 8 bytes as the format asks; the tensor bytes unchanged."""
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data[8 + size :]


def save_tensors(
    tensors: Mapping[str, torch.Tensor], path: str | Path, metadata: Mapping[str, str]
) -> None:
    """Write ``tensors`` (each contiguous, any shape) and string ``metadata`` to ``path`` as
    safetensors, atomically, with the header in a fixed order."""
    data = canonical_bytes(save(dict(tensors), metadata=dict(metadata)))
    with atomic_path(path) as tmp:
        _write(tmp, data)


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
