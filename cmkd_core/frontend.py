"""Front ends: WAV file -> log-mel or MFCC frames, image file -> grey-level array, in numpy,
scipy and Pillow only.

One implementation serves ``cmkd import wav`` and ``cmkd predict``/``cmkd serve`` (which must
not need torch), and its settings travel in ``dataset.json`` and the model card, so a deployed
student computes its inputs exactly as its training data were computed.
"""

from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np


class AudioError(ValueError):
    """A WAV file cannot be read or is empty; the message names it."""


@dataclass(frozen=True)
class AudioFrontEnd:
    """Mono, resampled to ``sample_rate``; pre-emphasis ``x[n] - preemphasis * x[n-1]``; Hann
    windows of ``win_ms`` every ``hop_ms``; power spectrum; ``n_mels`` triangular mel filters
    (HTK scale, 0 to Nyquist); natural log; for ``mfcc``, the first ``n_mfcc`` orthonormal
    DCT-II coefficients. With ``trim_db``, the leading and trailing frames whose energy is more
    than ``trim_db`` dB below the clip's loudest frame are dropped (silence before and after
    the word). ``normalise``: ``mean`` subtracts each clip's own mean of every feature,
    ``meanvar`` also divides by its standard deviation (per-utterance normalisation)."""

    sample_rate: int = 16000
    features: Literal["mfcc", "logmel"] = "mfcc"
    n_mels: int = 40
    n_mfcc: int = 13
    win_ms: float = 25.0
    hop_ms: float = 10.0
    preemphasis: float = 0.0
    trim_db: float | None = None
    normalise: Literal["none", "mean", "meanvar"] = "none"
    __pydantic_config__: ClassVar[dict] = {"extra": "forbid"}  # as a params.yaml section

    def __post_init__(self) -> None:
        bad = [
            f"{name} {value!r} ({rule})"
            for name, value, ok, rule in (
                ("sample_rate", self.sample_rate, self.sample_rate >= 1000, ">= 1000 Hz"),
                ("n_mels", self.n_mels, self.n_mels >= 1, ">= 1"),
                ("n_mfcc", self.n_mfcc, 1 <= self.n_mfcc <= self.n_mels, "1 to n_mels"),
                ("win_ms", self.win_ms, self.win_ms > 0, "> 0"),
                ("hop_ms", self.hop_ms, self.hop_ms > 0, "> 0"),
                ("preemphasis", self.preemphasis, 0 <= self.preemphasis < 1, "0 to 1"),
                ("trim_db", self.trim_db, self.trim_db is None or self.trim_db > 0, "> 0"),
            )
            if not ok
        ]
        if bad:
            raise ValueError("audio front end: " + "; ".join(bad))

    @property
    def num_features(self) -> int:
        return self.n_mfcc if self.features == "mfcc" else self.n_mels

    def to_json(self) -> dict:
        return {"kind": "audio", **asdict(self)}

    @classmethod
    def from_json(cls, raw: dict) -> AudioFrontEnd:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known - {"kind"})
        if unknown:
            raise ValueError(f"audio front end: unknown settings {unknown}; known: {sorted(known)}")
        return cls(**{k: v for k, v in raw.items() if k != "kind"})

    def __call__(self, audio: np.ndarray, rate: int) -> np.ndarray:
        """Frames ``(T, num_features)`` float32 of a mono signal ``audio (n,)`` at ``rate``."""
        from scipy import fft, signal  # here: importing scipy costs a params load 0.3 s

        if rate != self.sample_rate:
            g = math.gcd(rate, self.sample_rate)
            audio = signal.resample_poly(audio, self.sample_rate // g, rate // g)
        if self.preemphasis:
            audio = np.append(audio[:1], audio[1:] - self.preemphasis * audio[:-1])
        win = round(self.win_ms * self.sample_rate / 1000)
        hop = round(self.hop_ms * self.sample_rate / 1000)
        if len(audio) < win:
            audio = np.pad(audio, (0, win - len(audio)))
        frames = np.lib.stride_tricks.sliding_window_view(audio, win)[::hop]
        n_fft = 1 << (win - 1).bit_length()
        power = np.abs(np.fft.rfft(frames * signal.get_window("hann", win), n_fft)) ** 2
        if self.trim_db is not None:
            power = power[_voiced(power.sum(1), self.trim_db)]
        logmel = np.log(power @ _mel_filters(self.n_mels, n_fft, self.sample_rate).T + 1e-10)
        if self.features == "mfcc":
            logmel = fft.dct(logmel, type=2, norm="ortho", axis=1)[:, : self.n_mfcc]
        if self.normalise != "none":
            logmel = logmel - logmel.mean(0)
        if self.normalise == "meanvar":
            logmel = logmel / (logmel.std(0) + 1e-5)
        return logmel.astype(np.float32)


def _voiced(energy: np.ndarray, below_db: float) -> slice:
    """The frames from the first to the last whose ``energy`` (``(T,)``, power) is within
    ``below_db`` dB of the loudest frame; all frames when the clip is silent."""
    loud = np.flatnonzero(energy >= energy.max() * 10 ** (-below_db / 10))
    if energy.max() <= 0 or len(loud) == 0:
        return slice(None)
    return slice(int(loud[0]), int(loud[-1]) + 1)


def _mel_filters(n_mels: int, n_fft: int, rate: int) -> np.ndarray:
    """Triangular filters ``(n_mels, n_fft // 2 + 1)`` evenly spaced on the HTK mel scale."""
    mel = 2595 * np.log10(1 + np.array([0.0, rate / 2]) / 700)
    edges = 700 * (10 ** (np.linspace(mel[0], mel[1], n_mels + 2) / 2595) - 1)
    bins = np.fft.rfftfreq(n_fft, 1 / rate)
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (bins - lower) / (centre - lower)
    falling = (upper - bins) / (upper - centre)
    return np.maximum(0, np.minimum(rising, falling))


def read_wav(source: str | Path | bytes, name: str | None = None) -> tuple[np.ndarray, int]:
    """A WAV file (path or bytes) as a mono float signal in [-1, 1] and its sample rate."""
    from scipy.io import wavfile

    where = name or str(source if not isinstance(source, bytes) else "<bytes>")
    try:
        rate, data = wavfile.read(io.BytesIO(source) if isinstance(source, bytes) else source)
    except Exception as exc:  # scipy raises ValueError, EOFError, OSError for bad files
        raise AudioError(f"{where}: not a readable WAV file: {exc}") from None
    if data.dtype.kind == "u":
        data = (data.astype(np.float64) - 128) / 128
    elif data.dtype.kind == "i":
        data = data.astype(np.float64) / np.iinfo(data.dtype).max
    data = np.asarray(data, dtype=np.float64)
    if data.ndim == 2:
        data = data.mean(axis=1)
    if data.size == 0 or not np.isfinite(data).all():
        raise AudioError(f"{where}: empty or non-finite audio")
    return data, int(rate)


IMAGE_MODES = ("1", "L", "LA", "P", "RGB", "RGBA")
MAX_PIXELS = 4096 * 4096
"""The largest image decoded: its header is checked first, so a decompression bomb (a few
kilobytes of PNG declaring a gigapixel) costs nothing."""


@dataclass(frozen=True)
class ImageFrontEnd:
    """Converted to grey levels (``L``), resized to ``height`` x ``width`` (bilinear), scaled to
    [0, 1]. Only the modes in :data:`IMAGE_MODES` are accepted."""

    height: int = 28
    width: int = 28

    def to_json(self) -> dict:
        return {"kind": "image", **asdict(self)}

    @classmethod
    def from_json(cls, raw: dict) -> ImageFrontEnd:
        return cls(**{k: v for k, v in raw.items() if k != "kind"})

    def __call__(self, source: str | Path | bytes, name: str | None = None) -> np.ndarray:
        """The image as float32 ``(height, width)`` in [0, 1]."""
        from PIL import Image, UnidentifiedImageError

        where = name or str(source if not isinstance(source, bytes) else "<bytes>")
        try:
            with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
                if im.mode not in IMAGE_MODES:
                    raise ImageError(
                        f"{where}: image mode {im.mode!r}, expected one of {IMAGE_MODES}"
                    )
                if im.width * im.height > MAX_PIXELS:  # from the header, before decoding
                    raise ImageError(
                        f"{where}: {im.width} x {im.height} pixels > {MAX_PIXELS} "
                        "(a small file can declare a huge image); resize it first"
                    )
                grey = im.convert("L").resize((self.width, self.height), Image.BILINEAR)
                return np.asarray(grey, dtype=np.float32) / 255.0
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
            raise ImageError(f"{where}: not a readable image: {exc}") from None


class ImageError(ValueError):
    """An image file cannot be read or has a mode that is not accepted; names the file."""


def front_end_from_json(raw: object) -> AudioFrontEnd | ImageFrontEnd | None:
    """The front end a ``dataset.json`` or model card records, or ``None`` when it records none
    that files can be run through (no entry, or only a description, as for arrays imported
    ready-made). A recorded front end with unknown settings raises ``ValueError``."""
    if not isinstance(raw, dict) or raw.get("kind") not in ("audio", "image"):
        return None
    if raw["kind"] == "image":
        return ImageFrontEnd.from_json(raw)
    return AudioFrontEnd.from_json(raw)
