"""The teacher bank: what distillation needs of the teacher, extracted once.

The teacher runs once over its modality; its features, labels and split codes for every sample,
and the weights of its linear head, are stored in one safetensors file (no pickle). Distillation
draws class-matched rows from the bank and never runs the teacher, so the teacher's data and
encoder can stay behind.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from cmkd_core.data.contract import SPLITS
from cmkd_core.data.presets import Robustness
from cmkd_core.tensorfile import save_tensors


class BankError(ValueError):
    """A bank file is unreadable or inconsistent (names the file and the tensor)."""


@dataclass
class TeacherBank:
    """Teacher features and head.

    Attributes
    ----------
    features : Tensor ``(N, d)`` float32, the teacher encoder's output per sample.
    labels : Tensor ``(N,)`` int64, class indices into ``classes``.
    splits : Tensor ``(N,)`` int64, index into ``("train", "val", "test")``.
    head_weight : Tensor ``(C, d)``; head_bias : Tensor ``(C,)``, the teacher's linear head.
    classes : the class names, ``C`` of them.
    info : free-form provenance (teacher accuracy on its validation split, dataset, model).
    """

    features: torch.Tensor
    labels: torch.Tensor
    splits: torch.Tensor
    head_weight: torch.Tensor
    head_bias: torch.Tensor
    classes: tuple[str, ...]
    info: dict = field(default_factory=dict)
    ids: tuple[str, ...] = ()
    """Sample ids of the rows (so paired student samples can find their teacher row)."""

    def __post_init__(self) -> None:
        self.check()

    def check(self, where: str = "bank") -> None:
        """Raise :class:`BankError` naming the tensor whose shape or values are wrong."""
        n, c = self.features.shape[0], len(self.classes)
        expect = {
            "features": (self.features, 2, None),
            "labels": (self.labels, 1, (n,)),
            "splits": (self.splits, 1, (n,)),
            "head_weight": (self.head_weight, 2, (c, self.features.shape[-1])),
            "head_bias": (self.head_bias, 1, (c,)),
        }
        for name, (tensor, ndim, shape) in expect.items():
            if tensor.ndim != ndim or (shape is not None and tuple(tensor.shape) != shape):
                raise BankError(
                    f"{where}: tensor {name!r} has shape {tuple(tensor.shape)}, expected "
                    f"{shape if shape else f'{ndim} dimensions'}"
                )
        if not torch.isfinite(self.features).all():
            raise BankError(f"{where}: tensor 'features' holds NaN or inf")
        if n and (self.labels.min() < 0 or self.labels.max() >= c):
            raise BankError(f"{where}: tensor 'labels' holds an index outside 0..{c - 1}")
        if self.ids and len(self.ids) != n:
            raise BankError(f"{where}: {len(self.ids)} ids for {n} feature rows")
        if n and (self.splits.min() < 0 or self.splits.max() >= len(SPLITS)):
            raise BankError(f"{where}: tensor 'splits' holds a code outside 0..{len(SPLITS) - 1}")

    def split(self, name: str) -> torch.Tensor:
        """Boolean mask ``(N,)`` of the rows in split ``name``."""
        return self.splits == SPLITS.index(name)

    def class_proportions(self) -> torch.Tensor:
        """The share ``(C,)`` of each class among the train rows, float32."""
        counts = torch.bincount(self.labels[self.split("train")], minlength=len(self.classes))
        counts = counts.float()
        return counts / counts.sum()

    def rows_of(self, keys: list[str], where: str = "pair") -> torch.Tensor:
        """Bank row index ``(n,)`` of each id in ``keys``; an unknown key is an error."""
        index = {key: i for i, key in enumerate(self.ids)}
        missing = [k for k in keys if k not in index]
        if missing:
            raise BankError(
                f"{where}: {len(missing)} key(s) not in the teacher bank, e.g. {missing[:3]}"
            )
        return torch.tensor([index[k] for k in keys], dtype=torch.long)

    def head(self) -> nn.Linear:
        """The teacher's head as a frozen ``nn.Linear(d, C)``."""
        head = nn.Linear(self.head_weight.shape[1], self.head_weight.shape[0])
        with torch.no_grad():
            head.weight.copy_(self.head_weight)
            head.bias.copy_(self.head_bias)
        head.requires_grad_(False)
        return head


def save_bank(bank: TeacherBank, path: str | Path) -> None:
    """Write ``bank`` to a safetensors file atomically."""
    tensors = {
        "features": bank.features.float().contiguous(),
        "labels": bank.labels.long().contiguous(),
        "splits": bank.splits.long().contiguous(),
        "head_weight": bank.head_weight.float().contiguous(),
        "head_bias": bank.head_bias.float().contiguous(),
    }
    metadata = {
        "classes": json.dumps(list(bank.classes)),
        "info": json.dumps(bank.info),
        "ids": json.dumps(list(bank.ids)),
    }
    save_tensors(tensors, path, metadata)


def load_bank(path: str | Path) -> TeacherBank:
    """Read and check a bank file; any problem raises :class:`BankError` naming the file."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
            tensors = {key: fh.get_tensor(key) for key in fh.keys()}  # noqa: SIM118
    except Exception as exc:  # safetensors raises its own error types
        raise BankError(f"{path}: not a readable safetensors bank: {exc}") from None
    required = ("features", "labels", "splits", "head_weight", "head_bias")
    missing = [k for k in required if k not in tensors]
    if missing or "classes" not in metadata:
        raise BankError(
            f"{path}: missing {missing + ([] if 'classes' in metadata else ['classes'])}"
        )
    try:
        return TeacherBank(
            features=tensors["features"],
            labels=tensors["labels"],
            splits=tensors["splits"],
            head_weight=tensors["head_weight"],
            head_bias=tensors["head_bias"],
            classes=tuple(json.loads(metadata["classes"])),
            info=json.loads(metadata.get("info", "{}")),
            ids=tuple(json.loads(metadata.get("ids", "[]"))),
        )
    except BankError as exc:
        raise BankError(f"{path}: {exc}") from None


class FileBankCache:
    """Teacher banks as ``folder/NAME-KEY.safetensors`` (KEY: a digest of what decides the
    teacher, :func:`cmkd_core.benchmark.plan.teacher_key`); ``fresh`` ignores what is there, so the
    caller retrains."""

    def __init__(self, folder: Path, fresh: bool = False, log=print):
        self.folder, self.fresh, self.log = folder, fresh, log

    def path(self, key: str, name: str) -> Path:
        return self.folder / f"{name}-{key[:16]}.safetensors"

    def get(self, key: str, name: str) -> tuple[TeacherBank, float] | None:
        path = self.path(key, name)
        if self.fresh or not path.exists():
            return None
        try:
            bank = load_bank(path)
            accuracy = float(bank.info["test_accuracy"])
        except (BankError, KeyError) as exc:
            self.log(f"ignoring unreadable cached bank: {exc}")
            return None
        self.log(f"teacher bank from cache {path}")
        return bank, accuracy

    def put(self, key: str, name: str, bank: TeacherBank) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        save_bank(bank, self.path(key, name))


def restrict_bank(bank: TeacherBank, robustness: Robustness, seed: int) -> TeacherBank:
    """A bank whose train rows are thinned by marginal mismatch and label imbalance.

    Rows outside the train split are kept; at least one train row per class always remains.
    """
    if robustness.mismatch_ratio is None and robustness.imbalance_factor is None:
        return bank
    gen = torch.Generator().manual_seed(seed + 7919)
    keep = torch.ones(len(bank.labels), dtype=torch.bool)
    train = bank.split("train")
    num_classes = len(bank.classes)
    for k in range(num_classes):
        rows = torch.nonzero(train & (bank.labels == k)).flatten()
        rows = rows[torch.randperm(len(rows), generator=gen)]
        share = 1.0
        if robustness.mismatch_ratio is not None:
            share *= robustness.mismatch_ratio
        if robustness.imbalance_factor is not None and num_classes > 1:
            share *= robustness.imbalance_factor ** (-k / (num_classes - 1))
        keep[rows[max(1, round(share * len(rows))) :]] = False
    ids = tuple(i for i, k in zip(bank.ids, keep.tolist(), strict=True) if k) if bank.ids else ()
    return replace(
        bank,
        features=bank.features[keep],
        labels=bank.labels[keep],
        splits=bank.splits[keep],
        ids=ids,
        info={**bank.info, "robustness": robustness.__dict__},
    )
