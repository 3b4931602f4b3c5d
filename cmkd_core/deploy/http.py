"""The HTTP server of ``cmkd serve``: FastAPI over one :class:`OnnxStudent` (no torch).

``GET /healthz``, ``GET /v1/model`` (the model card) and ``POST /v1/predict``, which takes

- JSON ``{"inputs": [sample, ...]}``, each sample a nested list of numbers, or
- a binary array: ``application/x-npy`` (one sample, or a batch on a leading axis, every
  sequence at full length) or ``application/x-npz`` with ``x`` and, for sequences, ``lengths``;
- ``audio/wav``: one clip, through the audio front end the model card records.

Every bad request gets a 4xx whose ``detail`` names the limit or the field; bodies are read
up to ``max_body_bytes`` and no further, within ``body_timeout_s``. Nothing is decoded before
its size is known to fit: a JSON body's arrays are counted before parsing, an array's ``.npy``
header (shape, dtype) is checked before its data are read or decompressed, so no request holds
more than a few times ``max_body_bytes``. Decoding and inference run in worker threads, never on
the event loop, so ``/healthz`` answers while a large request is refused. :func:`serve` runs the
app with a header timeout: a connection that has not sent a request's headers within
``header_timeout_s`` is closed.
"""

from __future__ import annotations

import asyncio
import io
import math
import zipfile
import zlib
from collections.abc import Callable
from typing import IO

import anyio
import numpy as np
import orjson
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import ORJSONResponse

from cmkd_core.deploy.runtime import InputError, Limits, OnnxStudent

NPY, NPZ, WAV = "application/x-npy", "application/x-npz", "audio/wav"
ARRAY_BYTES_FACTOR = 4  # an array may hold at most this times max_body_bytes once decoded
MAX_NPZ_MEMBERS = 16
ShapeCheck = Callable[[tuple[int, ...]], None]
ZIP_ERRORS = (
    ValueError,
    OSError,
    EOFError,
    zipfile.BadZipFile,
    zlib.error,
    NotImplementedError,  # a compression method zipfile lacks
    RuntimeError,  # an encrypted member
)


async def _body(request: Request, max_bytes: int, timeout_s: float) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise HTTPException(400, f"content-length {declared!r} is not a number")
        if int(declared) > max_bytes:
            raise HTTPException(413, f"body of {declared} bytes > max_body_bytes {max_bytes}")
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_bytes:
                    chunks.clear()  # not kept alive by the traceback
                    raise HTTPException(413, f"body over max_body_bytes {max_bytes}")
                chunks.append(chunk)
    except TimeoutError:
        chunks.clear()
        raise HTTPException(408, f"body not received within body_timeout_s {timeout_s}") from None
    return b"".join(chunks)


def _max_json_arrays(student: OnnxStudent, limits: Limits) -> int:
    """How many JSON arrays (``[``) a request within ``limits`` can hold: the outer list and,
    per sample, one list for each index of every axis but the last."""
    sample = (limits.max_length, *student.sample_shape) if student.is_sequence else None
    dims = sample or student.sample_shape
    per_sample = 1 + sum(math.prod(dims[: i + 1]) for i in range(len(dims) - 1))
    return 1 + limits.max_batch * per_sample


def _json_samples(body: bytes, student: OnnxStudent, limits: Limits) -> list[np.ndarray]:
    arrays, most = body.count(b"["), _max_json_arrays(student, limits)
    if arrays > most:  # counted before parsing: a million tiny samples never become objects
        raise InputError(
            f"body: {arrays} JSON arrays, more than the {most} that max_batch {limits.max_batch} "
            f"samples of at most max_length {limits.max_length} frames hold"
        )
    try:
        payload = orjson.loads(body)  # strict JSON: NaN and Infinity are not numbers here
    except orjson.JSONDecodeError as exc:
        raise InputError(f"body: not valid JSON ({exc})") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("inputs"), list):
        raise InputError('body: expected a JSON object {"inputs": [sample, ...]}')
    inputs = payload["inputs"]
    if len(inputs) > limits.max_batch:  # before any sample becomes an array
        raise InputError(f"inputs: batch of {len(inputs)} > max_batch {limits.max_batch}")
    samples = []
    for i, sample in enumerate(inputs):
        try:
            samples.append(np.asarray(sample, dtype=np.float32))
        except (ValueError, TypeError):
            raise InputError(f"inputs[{i}]: not a rectangular array of numbers") from None
    return samples


def _read_npy(stream: IO[bytes], name: str, check: ShapeCheck, max_bytes: int) -> np.ndarray:
    """The array of one ``.npy`` stream, its header checked first: ``check(shape)`` raises
    :class:`InputError` for a shape that cannot be taken, and an array over ``max_bytes`` is
    refused; only then are its bytes read (and, in a zip, decompressed)."""
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream)
        else:
            raise ValueError(f".npy format version {version} is not supported")
    except ZIP_ERRORS as exc:
        raise InputError(f"{name}: not a readable .npy array: {exc}") from None
    if dtype.hasobject:
        raise InputError(f"{name}: not a readable .npy array: object arrays are not allowed")
    check(shape)
    size = math.prod(shape) * dtype.itemsize
    if size > max_bytes:
        raise InputError(
            f"{name}: declared shape {shape} of {dtype} is {size} bytes > {max_bytes} "
            f"({ARRAY_BYTES_FACTOR} x max_body_bytes)"
        )
    try:
        data = stream.read(size)
    except ZIP_ERRORS as exc:
        raise InputError(f"{name}: not a readable .npy array: {exc}") from None
    if len(data) < size:
        raise InputError(f"{name}: not a readable .npy array: {len(data)} of {size} bytes")
    return np.frombuffer(data, dtype).reshape(shape, order="F" if fortran else "C")


def _binary_samples(
    body: bytes, kind: str, student: OnnxStudent, limits: Limits, max_bytes: int
) -> list[np.ndarray]:
    def fits(where: str) -> ShapeCheck:  # an input array's declared shape against limits
        return lambda shape: student.check_declared(shape, limits, where)

    if kind == NPY:
        array = _read_npy(io.BytesIO(body), "body", fits("body"), max_bytes)
        return student.split_batch(array, "body")
    if body.count(b"PK\x01\x02") > MAX_NPZ_MEMBERS:  # central directory entries, not opened
        raise InputError(f"body: {NPZ} with more than {MAX_NPZ_MEMBERS} members")
    try:
        archive = zipfile.ZipFile(io.BytesIO(body))
        members = {n.removesuffix(".npy"): n for n in archive.namelist()}
    except ZIP_ERRORS as exc:
        raise InputError(f"body: not a readable {kind} array: {exc}") from None
    if "x" not in members:
        raise InputError(f"body: {NPZ} must hold an array named 'x'")

    def member(name: str, check: ShapeCheck) -> np.ndarray:
        try:
            stream = archive.open(members[name])
        except ZIP_ERRORS as exc:
            raise InputError(f"{name}: not a readable .npy array: {exc}") from None
        with stream:
            return _read_npy(stream, name, check, max_bytes)

    with archive:
        x = member("x", fits("x"))
        if not student.is_sequence or "lengths" not in members:
            return student.split_batch(x, "x")
        expected = f"lengths: expected ({len(x)},) integers for x of shape {x.shape}"

        def one_per_sample(shape: tuple[int, ...]) -> None:
            if shape != (len(x),):
                raise InputError(f"{expected}, not declared shape {shape}")

        lengths = member("lengths", one_per_sample)
    if lengths.dtype.kind not in "iu" or lengths.shape != (len(x),) or x.ndim != 3:
        raise InputError(expected)
    if (lengths < 1).any() or (lengths > x.shape[1]).any():
        raise InputError(f"lengths: each must be between 1 and {x.shape[1]} (frames in x)")
    return [x[i, : int(n)] for i, n in enumerate(lengths)]


def _status(error: InputError) -> int:
    """413 for an input over a limit, 422 for any other bad input."""
    too_big = ("max_batch", "max_length", "max_body_bytes")
    return 413 if any(limit in str(error) for limit in too_big) else 422


def create_app(
    student: OnnxStudent,
    limits: Limits,
    max_body_bytes: int = 8 << 20,
    body_timeout_s: float = 30.0,
    workers: int = 4,
) -> FastAPI:
    """The app serving ``student`` under ``limits`` (the session is shared, created once).

    A body must arrive within ``body_timeout_s`` (else 408); at most ``workers`` requests are
    decoded and predicted at once, each in a worker thread."""
    app = FastAPI(title="cmkd student", version="1")
    card = student.describe()
    card["limits"] = {
        "max_batch": limits.max_batch,
        "max_length": limits.max_length,
        "max_body_bytes": max_body_bytes,
    }
    array_bytes = ARRAY_BYTES_FACTOR * max_body_bytes
    workers_limit = anyio.CapacityLimiter(workers)

    def answer(body: bytes, kind: str) -> tuple[int, dict]:
        """The status and reply for one body, computed in a worker thread. A bad input's error
        ends here, so no traceback keeps the body or its arrays alive until a GC pass."""
        try:
            if kind == "application/json":
                samples = _json_samples(body, student, limits)
            elif kind == WAV:
                samples = [student.media_input(body, "body", limits)]
            else:
                samples = _binary_samples(body, kind, student, limits, array_bytes)
            predictions = student.predict(samples, limits)
        except InputError as exc:
            return _status(exc), {"detail": str(exc)}
        return 200, {"predictions": [p.as_json() for p in predictions]}

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
        body = await _body(request, max_body_bytes, body_timeout_s)
        status, reply = await anyio.to_thread.run_sync(answer, body, kind, limiter=workers_limit)
        return ORJSONResponse(reply, status_code=status)

    return app


def _header_timeout_protocol(
    base: type[asyncio.Protocol], timeout_s: float, max_header_bytes: int
) -> type[asyncio.Protocol]:
    """``base`` (uvicorn's HTTP/1.1 protocol) closing a connection whose request headers are
    not complete within ``timeout_s`` of its opening or of the last response (with a 408 when
    part of them came), or run past ``max_header_bytes`` (431). uvicorn has no such timeout of
    its own: its keep-alive timer stops at the first byte of a request."""

    class HeaderTimeout(base):  # type: ignore[misc, valid-type]
        _timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            self._await_headers()

        def _await_headers(self) -> None:
            self._stop_timer()
            self._previous, self._header_bytes = self.cycle, 0
            self._timer = self.loop.call_later(timeout_s, self._headers_late)

        def _stop_timer(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def _refuse(self, status: bytes) -> None:
            if self._header_bytes:  # a request was started: say why it ends
                self.transport.write(
                    b"HTTP/1.1 " + status + b"\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                )
            self.transport.close()

        def _headers_late(self) -> None:
            self._timer = None
            idle = self.cycle is None or self.cycle.response_complete
            if self.cycle is self._previous and idle and not self.transport.is_closing():
                self._refuse(b"408 Request Timeout")

        def data_received(self, data: bytes) -> None:
            # the rest of a body whose response was sent early (a 413) is no header
            body = self._previous is not None and self._previous is self.cycle
            if self._timer is not None and not (body and self._previous.more_body):
                self._header_bytes += len(data)
            super().data_received(data)
            if self._timer is None:
                return
            if self.cycle is not self._previous or self.transport.is_closing():
                self._stop_timer()  # the headers are in (or the connection ends)
            elif self._header_bytes > max_header_bytes:
                self._stop_timer()
                self._refuse(b"431 Request Header Fields Too Large")

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._await_headers()

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop_timer()
            super().connection_lost(exc)

    return HeaderTimeout


def serve(
    app: FastAPI,
    host: str,
    port: int,
    header_timeout_s: float = 10.0,
    max_header_bytes: int = 64 << 10,
    keep_alive_s: int = 5,
    log_level: str = "warning",
) -> None:
    """Run ``app`` with uvicorn until stopped, closing connections that send no complete request
    headers within ``header_timeout_s`` (slow or stalled clients) or more than
    ``max_header_bytes`` of them, and idle keep-alive connections after ``keep_alive_s``."""
    import uvicorn
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    protocol = _header_timeout_protocol(AutoHTTPProtocol, header_timeout_s, max_header_bytes)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        http=protocol,
        ws="none",
        timeout_keep_alive=keep_alive_s,
        log_level=log_level,
    )
    uvicorn.Server(config).run()
