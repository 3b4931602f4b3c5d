"""The HTTP server of ``cmkd serve``: FastAPI over one :class:`OnnxStudent` (no torch).

``GET /healthz``, ``GET /v1/model`` (the model card) and ``POST /v1/predict``, which takes

- JSON ``{"inputs": [sample, ...]}``, each sample a nested list of numbers, or
- a binary array: ``application/x-npy`` (one sample, or a batch on a leading axis, every
  sequence at full length) or ``application/x-npz`` with ``x`` and, for sequences, ``lengths``;
- ``audio/wav``: one clip, through the audio front end the model card records.

Every bad request gets a 4xx whose ``detail`` names the limit or the field; bodies are read
up to ``max_body_bytes`` and no further.
"""

from __future__ import annotations

import io
import zipfile

import numpy as np
import orjson
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import ORJSONResponse

from cmkd_core.deploy.runtime import InputError, Limits, OnnxStudent

NPY, NPZ, WAV = "application/x-npy", "application/x-npz", "audio/wav"


async def _body(request: Request, max_bytes: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise HTTPException(400, f"content-length {declared!r} is not a number")
        if int(declared) > max_bytes:
            raise HTTPException(413, f"body of {declared} bytes > max_body_bytes {max_bytes}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise HTTPException(413, f"body over max_body_bytes {max_bytes}")
        chunks.append(chunk)
    return b"".join(chunks)


def _json_samples(body: bytes) -> list[np.ndarray]:
    try:
        payload = orjson.loads(body)  # strict JSON: NaN and Infinity are not numbers here
    except orjson.JSONDecodeError as exc:
        raise InputError(f"body: not valid JSON ({exc})") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("inputs"), list):
        raise InputError('body: expected a JSON object {"inputs": [sample, ...]}')
    samples = []
    for i, sample in enumerate(payload["inputs"]):
        try:
            samples.append(np.asarray(sample, dtype=np.float32))
        except (ValueError, TypeError):
            raise InputError(f"inputs[{i}]: not a rectangular array of numbers") from None
    return samples


def _binary_samples(body: bytes, kind: str, student: OnnxStudent) -> list[np.ndarray]:
    try:
        loaded = np.load(io.BytesIO(body), allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise InputError(f"body: not a readable {kind} array: {exc}") from None
    if kind == NPY:
        if not isinstance(loaded, np.ndarray):
            raise InputError(f"body: {NPY} must hold one array")
        return student.split_batch(loaded, "body")
    if not isinstance(loaded, np.lib.npyio.NpzFile) or "x" not in loaded.files:
        raise InputError(f"body: {NPZ} must hold an array named 'x'")
    x = loaded["x"]
    if not student.is_sequence or "lengths" not in loaded.files:
        return student.split_batch(x, "x")
    lengths = loaded["lengths"]
    if lengths.dtype.kind not in "iu" or lengths.shape != (len(x),) or x.ndim != 3:
        raise InputError(f"lengths: expected ({len(x)},) integers for x of shape {x.shape}")
    if (lengths < 1).any() or (lengths > x.shape[1]).any():
        raise InputError(f"lengths: each must be between 1 and {x.shape[1]} (frames in x)")
    return [x[i, : int(n)] for i, n in enumerate(lengths)]


def create_app(student: OnnxStudent, limits: Limits, max_body_bytes: int = 8 << 20) -> FastAPI:
    """The app serving ``student`` under ``limits`` (the session is shared, created once)."""
    app = FastAPI(title="cmkd student", version="1")
    card = student.describe()
    card["limits"] = {
        "max_batch": limits.max_batch,
        "max_length": limits.max_length,
        "max_body_bytes": max_body_bytes,
    }

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/v1/model")
    def model() -> dict:
        return card

    @app.post("/v1/predict")
    async def predict(request: Request) -> ORJSONResponse:
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind not in ("application/json", NPY, NPZ, WAV):
            raise HTTPException(
                415, f"content-type {kind!r}: use application/json, {NPY}, {NPZ} or {WAV}"
            )
        body = await _body(request, max_body_bytes)
        try:
            if kind == "application/json":
                samples = _json_samples(body)
            elif kind == WAV:
                samples = [student.media_input(body, "body")]
            else:
                samples = _binary_samples(body, kind, student)
            predictions = student.predict(samples, limits)
        except InputError as exc:
            too_big = "max_batch" in str(exc) or "max_length" in str(exc)
            raise HTTPException(413 if too_big else 422, str(exc)) from None
        return ORJSONResponse({"predictions": [p.as_json() for p in predictions]})

    return app
