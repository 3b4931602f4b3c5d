"""Inference on an exported student with onnxruntime and numpy only (no torch).

A deployment needs the ``.onnx`` file and, beside it, the ``model_card.json`` the export stage
writes (class names, input spec). Every input is checked before it reaches the session: each
problem raises :class:`InputError` naming the input and the limit or field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from cmkd_core.deploy import novelty
from cmkd_core.frontend import (
    AudioError,
    ImageError,
    ImageFrontEnd,
    front_end_from_json,
    read_wav,
)

MEDIA = (".wav", ".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff")
MAX_RATE = 768_000  # Hz: resampling a WAV builds a filter as long as its rate ratio


class InputError(ValueError):
    """An input the model cannot take; the message names the input and what is wrong."""


class ModelError(ValueError):
    """The model file or its card cannot be used."""


@dataclass(frozen=True)
class Limits:
    """Bounds on one request: samples per batch and frames per sequence."""

    max_batch: int = 64
    max_length: int = 4096


@dataclass(frozen=True)
class Prediction:
    """The predicted class of one sample and the softmax probabilities of every class."""

    label: str
    index: int
    probabilities: dict[str, float]
    unusual: float | None = None
    """The input's distance from the training data (cmkd_core/deploy/novelty.py) when it is
    farther than any train or validation sample was; ``None`` when it is not."""

    def as_json(self) -> dict:
        out = {"class": self.label, "index": self.index, "probabilities": self.probabilities}
        out["unusual"] = self.unusual is not None
        if self.unusual is not None:
            out["distance"] = round(self.unusual, 3)
        return out


def card_path_for(model: Path) -> Path:
    """Where the export stage puts the card of ``model``: ``model_card.json`` beside it."""
    return model.with_name("model_card.json")


class OnnxStudent:
    """One onnxruntime session over an exported student, created once.

    Sequence students take samples of shape ``(T, F)``, fixed-size students samples of their
    ``sample_shape``; :meth:`predict` pads a batch of sequences and passes their lengths.
    """

    def __init__(self, model: str | Path, card: str | Path | None = None, threads: int = 0):
        self.path = Path(model)
        if not self.path.is_file():
            raise ModelError(f"{self.path}: no such model file")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(
                str(self.path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own error types
            raise ModelError(f"{self.path}: not a loadable ONNX model: {exc}") from None
        names = [i.name for i in self.session.get_inputs()]
        if names not in (["x"], ["x", "lengths"]):
            raise ModelError(f"{self.path}: inputs {names}, expected ['x'] or ['x', 'lengths']")
        self.is_sequence = names == ["x", "lengths"]
        shape = self.session.get_inputs()[0].shape
        self.sample_shape = tuple(int(d) for d in shape[2 if self.is_sequence else 1 :])
        outputs = self.session.get_outputs()
        if [o.name for o in outputs] != ["logits"]:
            raise ModelError(f"{self.path}: expected one output named 'logits'")
        num_classes = int(outputs[0].shape[1])
        card_file = Path(card) if card is not None else card_path_for(self.path)
        self.card: dict = {}
        if card_file.is_file():
            try:
                self.card = json.loads(card_file.read_text())
            except json.JSONDecodeError as exc:
                raise ModelError(f"{card_file}: not valid JSON: {exc}") from None
        elif card is not None:
            raise ModelError(f"{card_file}: no such model card")
        self.classes = [str(c) for c in self.card.get("classes", range(num_classes))]
        try:
            self.front_end = front_end_from_json(self.card.get("front_end"))
        except (TypeError, ValueError) as exc:
            raise ModelError(f"{card_file}: its front_end cannot be used: {exc}") from None
        if len(self.classes) != num_classes:
            raise ModelError(
                f"{card_file}: {len(self.classes)} classes but the model has {num_classes} outputs"
            )

    def describe(self) -> dict:
        """The model card, or what the ONNX file alone says when there is none."""
        spec = {
            "file": self.path.name,
            "classes": self.classes,
            "input": {
                "kind": "sequence" if self.is_sequence else "fixed",
                "sample_shape": ["time", *self.sample_shape]
                if self.is_sequence
                else list(self.sample_shape),
                "dtype": "float32",
            },
        }
        return {**spec, **self.card}

    def check(
        self,
        samples: list[np.ndarray],
        limits: Limits,
        where: str = "inputs",
        names: list[str] | None = None,
    ) -> None:
        """Raise :class:`InputError` unless every sample fits the model and ``limits``; errors
        name the sample ``names[i]`` (default ``where[i]``)."""
        if not samples:
            raise InputError(f"{where}: empty batch")
        if len(samples) > limits.max_batch:
            raise InputError(f"{where}: batch of {len(samples)} > max_batch {limits.max_batch}")
        for i, x in enumerate(samples):
            name = names[i] if names is not None else f"{where}[{i}]"
            if x.dtype.kind not in "fiu":
                raise InputError(f"{name}: dtype {x.dtype} is not numeric")
            expected = ("T", *self.sample_shape) if self.is_sequence else self.sample_shape
            if self.is_sequence:
                ok = x.ndim == 2 and x.shape[1:] == self.sample_shape and x.shape[0] >= 1
            else:
                ok = x.shape == self.sample_shape
            if not ok:
                raise InputError(f"{name}: shape {tuple(x.shape)}, expected {expected}")
            if self.is_sequence and x.shape[0] > limits.max_length:
                raise InputError(f"{name}: {x.shape[0]} frames > max_length {limits.max_length}")
            with np.errstate(over="ignore", invalid="ignore"):  # checked as the model sees it
                finite = np.isfinite(x.astype(np.float32, copy=False)).all()
            if not finite:
                raise InputError(f"{name}: contains NaN or infinite values (as float32)")

    def check_declared(self, shape: tuple[int, ...], limits: Limits, where: str) -> None:
        """Raise :class:`InputError` unless an array of ``shape`` (as its header declares it,
        before its data are read) is one sample or a batch within ``limits``."""
        single = 2 if self.is_sequence else len(self.sample_shape)
        if len(shape) not in (single, single + 1):
            raise InputError(self._shape_error(shape, where))
        batch = shape[0] if len(shape) == single + 1 else 1
        if batch > limits.max_batch:
            raise InputError(
                f"{where}: declared shape {shape}: batch of {batch} > max_batch {limits.max_batch}"
            )
        if self.is_sequence and shape[-2] > limits.max_length:
            raise InputError(
                f"{where}: declared shape {shape}: {shape[-2]} frames > max_length "
                f"{limits.max_length}"
            )

    def logits(self, samples: list[np.ndarray]) -> np.ndarray:
        """Logits ``(B, C)`` for checked samples (see :meth:`check`)."""
        if not self.is_sequence:
            x = np.stack([s.astype(np.float32) for s in samples])
            return self.session.run(["logits"], {"x": x})[0]
        lengths = np.array([len(s) for s in samples], dtype=np.int64)
        x = np.zeros((len(samples), max(2, int(lengths.max())), *self.sample_shape), np.float32)
        for i, s in enumerate(samples):
            x[i, : len(s)] = s
        return self.session.run(["logits"], {"x": x, "lengths": lengths})[0]

    def predict(
        self,
        samples: list[np.ndarray],
        limits: Limits | None = None,
        where: str = "inputs",
        names: list[str] | None = None,
    ) -> list[Prediction]:
        """Check ``samples`` against ``limits`` and predict each one's class."""
        limits = limits or Limits(max_batch=max(1, len(samples)), max_length=1 << 31)
        self.check(samples, limits, where, names)
        logits = self.logits(samples).astype(np.float64)
        for i in np.flatnonzero(~np.isfinite(logits).all(1))[:1]:  # never a NaN probability
            name = names[i] if names is not None else f"{where}[{i}]"
            raise InputError(f"{name}: the model's output is not finite (values too large?)")
        probs = np.exp(logits - logits.max(1, keepdims=True))
        probs /= probs.sum(1, keepdims=True)
        far = novelty.unusual(self.card.get("input_check"), samples, self.is_sequence)
        return [
            Prediction(
                self.classes[int(p.argmax())],
                int(p.argmax()),
                {c: round(float(v), 6) for c, v in zip(self.classes, p, strict=True)},
                distance,
            )
            for p, distance in zip(probs, far, strict=True)
        ]

    def media_input(self, data: bytes, where: str, limits: Limits | None = None) -> np.ndarray:
        """The model's input for a WAV or image file, through the front end its card records
        (the one its training data were imported with). With ``limits``, a WAV whose frames
        would pass ``max_length`` is refused before they are computed."""
        front_end = self.front_end
        if front_end is None:
            raise InputError(
                f"{where}: this model takes arrays, not audio or image files: its card records "
                f"no front end (its data were imported as arrays); pass a .npy file of "
                f"{self._expected()} instead"
            )
        try:
            if isinstance(front_end, ImageFrontEnd):
                return front_end(data, where)
            audio, rate = read_wav(data, where)
        except (AudioError, ImageError) as exc:
            raise InputError(str(exc)) from None
        if not 0 < rate <= MAX_RATE:
            raise InputError(f"{where}: sample rate {rate} Hz, expected 1 to {MAX_RATE}")
        per_ms = front_end.sample_rate / 1000  # fewest frames the front end will make:
        win, hop = round(front_end.win_ms * per_ms), round(front_end.hop_ms * per_ms)
        frames = int((len(audio) * front_end.sample_rate / rate - win) / hop)
        if limits is not None and frames > limits.max_length:
            raise InputError(f"{where}: {frames} frames or more > max_length {limits.max_length}")
        try:
            return front_end(audio, rate)
        except (AudioError, ImageError) as exc:
            raise InputError(str(exc)) from None

    def split_batch(self, array: np.ndarray, where: str) -> list[np.ndarray]:
        """The samples of one array: a single sample, or a batch along a leading axis."""
        single = 2 if self.is_sequence else len(self.sample_shape)
        if array.ndim == single:
            return [array]
        if array.ndim == single + 1:
            return list(array)
        raise InputError(self._shape_error(array.shape, where))

    def _expected(self) -> str:
        """One sample's shape as the messages say it, e.g. ``(T, 13) float32``."""
        shape = ("T", *self.sample_shape) if self.is_sequence else self.sample_shape
        return f"shape ({', '.join(map(str, shape))}) float32"

    def _shape_error(self, shape: tuple[int, ...], where: str) -> str:
        expected = ("T", *self.sample_shape) if self.is_sequence else self.sample_shape
        return f"{where}: shape {tuple(shape)}, expected one sample {expected} or a batch of them"


def read_inputs(path: str | Path, student: OnnxStudent) -> list[tuple[str, np.ndarray]]:
    """``(name, sample)`` for a ``.npy`` file (one sample or a batch) or every ``.npy`` in a
    folder, sorted. A ``.wav`` needs the audio front end recorded in the model card."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in (".npy", *MEDIA))
        if not files:
            raise InputError(f"{path}: no .npy, audio or image files in this folder")
    elif path.is_file():
        files = [path]
    else:
        raise InputError(f"{path}: no such file or folder")
    out: list[tuple[str, np.ndarray]] = []
    for file in files:
        if file.suffix.lower() in MEDIA:
            out.append((str(file), student.media_input(file.read_bytes(), str(file))))
            continue
        if file.suffix.lower() != ".npy":
            raise InputError(f"{file}: expected a .npy array")
        try:
            array = np.load(file, allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise InputError(f"{file}: not a readable .npy array: {exc}") from None
        samples = student.split_batch(array, str(file))
        names = [str(file)] if len(samples) == 1 else [f"{file}[{i}]" for i in range(len(samples))]
        out += list(zip(names, samples, strict=True))
    return out
