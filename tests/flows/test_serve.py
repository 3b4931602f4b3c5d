"""``cmkd predict`` and ``cmkd serve`` on a real exported student: a real server process on a
free loopback port, a real HTTP client, every kind of bad request, and no torch at serve time."""

from __future__ import annotations

import contextlib
import io
import json
import socket
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from cmkd_core.data import check_pair
from cmkd_core.deploy import Limits
from cmkd_core.distill import extract_bank
from cmkd_core.export import export_onnx
from cmkd_core.recipes import fit_student, fit_teacher

ROOT = Path(__file__).resolve().parents[2]
LIMITS = ["--max-batch", "8", "--max-length", "300", "--max-body-bytes", "400000"]


@contextlib.contextmanager
def _serving(command: list[str], port: int) -> Iterator[httpx.Client]:
    """A client of the server ``command`` starts on ``port``, once it answers; the server's
    pid and port on the client (for memory readings); the server stopped on the way out."""
    process = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
    try:
        _wait_healthy(client, process)
        client.server_pid, client.port = process.pid, port
        yield client
    finally:
        client.close()
        process.terminate()
        process.wait(timeout=30)


def _wait_healthy(client: httpx.Client, process: subprocess.Popen) -> None:
    """Until the server at ``client`` answers ``/healthz`` (30 s at most)."""
    for _ in range(300):
        try:
            if client.get("/healthz").status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.1)
    pytest.fail(f"server did not start: {process.stdout.read()}")


@pytest.fixture(scope="module")
def exported(pair_root, tiny_params, tmp_path_factory):
    """A tiny trained student exported to ONNX with a card, and test clips as .npy files."""
    prepared = pair_root / "data" / "prepared"
    teacher_ds, student_ds = check_pair(prepared / "teacher", prepared / "student")
    cpu = "cpu"
    teacher, _ = fit_teacher(teacher_ds, tiny_params.teacher, cpu, progress=False)
    bank = extract_bank(teacher.model, teacher_ds, {})
    student, split = fit_student(
        student_ds, bank, tiny_params.distill, "joint", cpu, progress=False
    )
    folder = tmp_path_factory.mktemp("export")
    model = export_onnx(student.model, split["test"], folder / "student.onnx")
    classes = list(student_ds.meta.classes)
    (folder / "model_card.json").write_text(json.dumps({"classes": classes, "method": "joint"}))
    clips = folder / "clips"
    clips.mkdir()
    test = split["test"]
    x, lengths = (t.numpy() for t in test.take(torch.arange(len(test)))[0])
    for i in range(40):
        np.save(clips / f"clip{i:03d}.npy", x[i, : lengths[i]])
    return {
        "model": model,
        "clips": clips,
        "labels": test.labels.numpy()[:40],
        "classes": classes,
        "samples": [x[i, : lengths[i]] for i in range(40)],
    }


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cmkd_app.cli", *args], cwd=ROOT, capture_output=True, text=True
    )


def test_predict_prints_a_class_per_clip_and_json(exported):
    done = _cli("predict", str(exported["model"]), str(exported["clips"]), "--json")
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    assert [Path(r["input"]).name for r in rows] == [f"clip{i:03d}.npy" for i in range(40)]
    for row in rows:
        assert row["class"] in exported["classes"]
        assert sum(row["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
        assert row["probabilities"][row["class"]] == max(row["probabilities"].values())
    text = _cli("predict", str(exported["model"]), str(exported["clips"] / "clip000.npy"))
    assert text.returncode == 0 and text.stdout.splitlines()[1].split("\t")[1] == rows[0]["class"]


def test_predict_refuses_bad_input_with_exit_2(exported, tmp_path):
    np.save(tmp_path / "bad.npy", np.zeros((30, 12), np.float32))
    done = _cli("predict", str(exported["model"]), str(tmp_path / "bad.npy"))
    assert done.returncode == 2
    assert "bad.npy: shape (30, 12), expected ('T', 13)" in done.stderr
    (tmp_path / "a.wav").write_bytes(b"RIFF")
    wav = _cli("predict", str(exported["model"]), str(tmp_path / "a.wav"))
    assert wav.returncode == 2 and "its card records no front end" in wav.stderr
    missing = _cli("predict", str(tmp_path / "none.onnx"), str(tmp_path / "bad.npy"))
    assert missing.returncode == 2 and "none.onnx: no such model file" in missing.stderr


@pytest.fixture(scope="module")
def server(exported):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "cmkd_app.cli", "serve", str(exported["model"])]
    with _serving([*command, "--port", str(port), *LIMITS], port) as client:
        yield client


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return buffer.getvalue()


def _good(server, exported) -> list[str]:
    samples = exported["samples"][:4]
    response = server.post("/v1/predict", json={"inputs": [s.tolist() for s in samples]})
    assert response.status_code == 200, response.text
    return [p["class"] for p in response.json()["predictions"]]


def test_server_answers_health_card_and_predict_like_the_cli(server, exported):
    assert server.get("/healthz").json() == {"status": "ok"}
    card = server.get("/v1/model").json()
    assert card["classes"] == exported["classes"] and card["limits"]["max_batch"] == 8
    assert card["input"]["sample_shape"] == ["time", 13]
    done = _cli("predict", str(exported["model"]), str(exported["clips"]), "--json")
    cli_classes = [r["class"] for r in json.loads(done.stdout)]
    assert _good(server, exported) == cli_classes[:4]
    # Binary forms: one padded batch with lengths (npz), and one sample (npy).
    samples = exported["samples"][:4]
    lengths = np.array([len(s) for s in samples])
    x = np.zeros((4, lengths.max(), 13), np.float32)
    for i, s in enumerate(samples):
        x[i, : len(s)] = s
    buffer = io.BytesIO()
    np.savez(buffer, x=x, lengths=lengths)
    npz = server.post(
        "/v1/predict", content=buffer.getvalue(), headers={"content-type": "application/x-npz"}
    )
    assert [p["class"] for p in npz.json()["predictions"]] == cli_classes[:4]
    one = server.post(
        "/v1/predict", content=_npy(samples[0]), headers={"content-type": "application/x-npy"}
    )
    assert one.json()["predictions"][0]["class"] == cli_classes[0]


def _declared_npz(shape: tuple[int, ...], zeros: int = 0) -> bytes:
    """A compressed npz whose ``x`` declares ``shape`` (float32) in its header and holds
    ``zeros`` zero bytes (all of them for a zip bomb, none for a truncated array)."""
    buffer = io.BytesIO()
    with (
        zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive,
        archive.open("x.npy", "w", force_zip64=True) as member,
    ):
        header = {"descr": "<f4", "fortran_order": False, "shape": shape}
        np.lib.format.write_array_header_1_0(member, header)
        chunk = bytes(min(zeros, 16 << 20))
        for start in range(0, zeros, len(chunk) or 1):
            member.write(chunk[: zeros - start])
    return buffer.getvalue()


def _chunks():
    for _ in range(100):
        yield b"[" * 10_000


BAD = {
    "invalid JSON": (
        {"content": b"{inputs:", "headers": {"content-type": "application/json"}},
        422,
        "not valid JSON",
    ),
    "no inputs key": ({"json": {"x": []}}, 422, '{"inputs"'),
    "empty batch": ({"json": {"inputs": []}}, 422, "empty batch"),
    "wrong feature size": (
        {"json": {"inputs": [[[0.0] * 12] * 20]}},
        422,
        "inputs[0]: shape (20, 12)",
    ),
    "one frame of 3 axes": (
        {"json": {"inputs": [[[[0.0] * 13] * 2] * 2]}},
        422,
        "inputs[0]: shape (2, 2, 13)",
    ),
    "NaN in JSON": (
        {
            "content": b'{"inputs": [[[NaN' + b", 0" * 12 + b"]]]}",
            "headers": {"content-type": "application/json"},
        },
        422,
        "not valid JSON",
    ),
    "NaN in an array": (
        {
            "content": _npy(np.full((5, 13), np.nan, np.float32)),
            "headers": {"content-type": "application/x-npy"},
        },
        422,
        "inputs[0]: contains NaN",
    ),
    "infinity in an array": (
        {
            "content": _npy(np.full((2, 5, 13), np.inf)),
            "headers": {"content-type": "application/x-npy"},
        },
        422,
        "inputs[0]: contains NaN or infinite",
    ),
    "number too large for float32": (
        {"json": {"inputs": [[[1e300] * 13] * 3]}},
        422,
        "inputs[0]: contains NaN or infinite",
    ),
    "strings": ({"json": {"inputs": [[["a"] * 13]]}}, 422, "inputs[0]: not a rectangular array"),
    "ragged": (
        {"json": {"inputs": [[[0.0] * 13, [0.0] * 5]]}},
        422,
        "inputs[0]: not a rectangular",
    ),
    "batch too large": ({"json": {"inputs": [[[0.0] * 13] * 3] * 9}}, 413, "max_batch 8"),
    "sequence too long": ({"json": {"inputs": [[[0.0] * 13] * 301]}}, 413, "max_length 300"),
    "body too large": (
        {"content": b"0" * 400_001, "headers": {"content-type": "application/json"}},
        413,
        "max_body_bytes 400000",
    ),
    "chunked body too large": (
        {"content": _chunks, "headers": {"content-type": "application/json"}},
        413,
        "max_body_bytes 400000",
    ),
    "unsupported type": (
        {"content": b"1,2", "headers": {"content-type": "text/csv"}},
        415,
        "text/csv",
    ),
    "corrupt npy": (
        {"content": b"\x93NUMPY garbage", "headers": {"content-type": "application/x-npy"}},
        422,
        "not a readable",
    ),
    "pickled npy": (
        {
            "content": _npy(np.array([{"a": 1}], dtype=object)),
            "headers": {"content-type": "application/x-npy"},
        },
        422,
        "not a readable",
    ),
    "bool dtype": (
        {
            "content": _npy(np.zeros((5, 13), bool)),
            "headers": {"content-type": "application/x-npy"},
        },
        422,
        "dtype bool",
    ),
    "npy of 4 axes": (
        {
            "content": _npy(np.zeros((1, 2, 5, 13), np.float32)),
            "headers": {"content-type": "application/x-npy"},
        },
        422,
        "body: shape (1, 2, 5, 13)",
    ),
    "float64 past float32's range": (
        {
            "content": _npy(np.full((5, 13), 1e300)),
            "headers": {"content-type": "application/x-npy"},
        },
        422,
        "inputs[0]: contains NaN or infinite",
    ),
    "npz declaring 40M frames": (
        {
            "content": _declared_npz((40_000_000, 13)),
            "headers": {"content-type": "application/x-npz"},
        },
        413,
        "x: declared shape (40000000, 13): 40000000 frames > max_length 300",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_each_bad_request_gets_its_4xx_and_the_server_keeps_serving(server, exported, case):
    kwargs, status, message = BAD[case]
    if callable(kwargs.get("content")):
        kwargs = {**kwargs, "content": kwargs["content"]()}
    response = server.post("/v1/predict", **kwargs)
    assert response.status_code == status, response.text
    assert message in response.json()["detail"]
    assert len(_good(server, exported)) == 4


def test_a_body_refused_early_leaves_the_connection_usable(server, exported):
    """A 413 sent before a large body has arrived: the rest of that body is not taken for the
    next request's headers (it once was, and the next request on the connection got 431)."""
    clip = exported["samples"][0]
    with httpx.Client(base_url=server.base_url, timeout=30) as client:
        for _ in range(5):
            big = client.post(
                "/v1/predict",
                content=b"0" * 2_000_000,
                headers={"content-type": "application/json"},
            )
            assert big.status_code == 413
            good = client.post("/v1/predict", json={"inputs": [clip.tolist()]})
            assert good.status_code == 200, good.text


def test_bounded_load_of_good_and_bad_requests_no_error_and_flat_memory(server, exported):
    """2,000 requests (1,000 good, 1,000 of the bad kinds above, not streamed) from 8 threads
    at once, within 120 s: every good one answered 200 with the class it gets alone, every bad one
    its 4xx; the server's resident memory grows by less than 16 MiB over the run."""
    import psutil

    clips = exported["samples"][:6]
    expected = [
        server.post("/v1/predict", json={"inputs": [c.tolist()]}).json()["predictions"][0]["class"]
        for c in clips
    ]
    bad = [(k, v) for k, v in BAD.items() if not callable(v[0].get("content"))]
    work = []
    for i in range(1000):
        work.append(("good", i % len(clips)))
        work.append(("bad", i % len(bad)))

    def send(item, client):
        kind, index = item
        if kind == "good":
            response = client.post("/v1/predict", json={"inputs": [clips[index].tolist()]})
            ok = response.status_code == 200
            if ok and response.json()["predictions"][0]["class"] == expected[index]:
                return True
            return (kind, index, response.status_code, response.text[:200])
        kwargs, status, message = bad[index][1]
        response = client.post("/v1/predict", **kwargs)
        if response.status_code == status and message in response.json()["detail"]:
            return True
        return (bad[index][0], response.status_code, response.text[:200])

    def run(items):
        with httpx.Client(base_url=server.base_url, timeout=30) as client:
            return [send(item, client) for item in items]

    process = psutil.Process(server.server_pid)
    run(work[:100])  # warm-up: allocator pools, onnxruntime arenas
    before = process.memory_info().rss
    start = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        results = [r for chunk in pool.map(run, [work[i::8] for i in range(8)]) for r in chunk]
    elapsed = time.monotonic() - start
    growth = (process.memory_info().rss - before) / 2**20
    print(f"\n2000 requests in {elapsed:.1f} s, server memory growth {growth:.1f} MiB")
    failed = [r for r in results if r is not True]
    assert len(results) == 2000 and failed == [], failed[:5]
    assert elapsed < 120
    assert growth < 16


def test_npz_lengths_past_the_array_are_refused(server):
    buffer = io.BytesIO()
    np.savez(buffer, x=np.zeros((2, 10, 13), np.float32), lengths=np.array([10, 11]))
    response = server.post(
        "/v1/predict", content=buffer.getvalue(), headers={"content-type": "application/x-npz"}
    )
    assert response.status_code == 422 and "between 1 and 10" in response.json()["detail"]


def test_serving_code_runs_without_torch(exported):
    """A deployment needs onnxruntime, numpy and FastAPI only: torch import is blocked."""
    script = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this test")
sys.meta_path.insert(0, Block())
import numpy as np
from fastapi.testclient import TestClient
from cmkd_core.deploy import Limits, OnnxStudent
from cmkd_core.deploy.http import create_app
student = OnnxStudent({str(exported["model"])!r})
client = TestClient(create_app(student, Limits()))
reply = client.post("/v1/predict", json={{"inputs": [np.zeros((20, 13)).tolist()]}})
assert reply.status_code == 200, reply.text
from cmkd_app.cli import main
assert main(["predict", {str(exported["model"])!r}, {str(exported["clips"])!r}]) == 0
assert "torch" not in sys.modules
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("ok") and "clip039.npy" in done.stdout


def test_a_wav_goes_through_the_front_end_its_card_records(exported, tmp_path):
    """predict and serve compute a WAV's frames with the card's front end, exactly as the
    import did; the result equals predicting those frames as an array."""
    import shutil

    from fastapi.testclient import TestClient
    from scipy.io import wavfile

    from cmkd_core.deploy import OnnxStudent
    from cmkd_core.deploy.http import create_app
    from cmkd_core.frontend import AudioFrontEnd

    front = AudioFrontEnd(sample_rate=8000, features="mfcc", n_mfcc=13)
    model = tmp_path / "student.onnx"
    shutil.copy(exported["model"], model)
    card = {"classes": exported["classes"], "front_end": front.to_json()}
    (tmp_path / "model_card.json").write_text(json.dumps(card))
    t = np.arange(4000) / 16000
    wavfile.write(
        tmp_path / "clip.wav", 16000, (0.3 * np.sin(2 * np.pi * 440 * t) * 32767).astype(np.int16)
    )
    rate, data = wavfile.read(tmp_path / "clip.wav")
    np.save(tmp_path / "clip.npy", front(data / 32767, rate))
    by_wav = json.loads(_cli("predict", str(model), str(tmp_path / "clip.wav"), "--json").stdout)
    by_npy = json.loads(_cli("predict", str(model), str(tmp_path / "clip.npy"), "--json").stdout)
    assert by_wav[0]["probabilities"] == by_npy[0]["probabilities"]
    client = TestClient(create_app(OnnxStudent(model), Limits()))
    reply = client.post(
        "/v1/predict",
        content=(tmp_path / "clip.wav").read_bytes(),
        headers={"content-type": "audio/wav"},
    )
    assert (
        reply.status_code == 200 and reply.json()["predictions"][0]["class"] == by_wav[0]["class"]
    )
    bad = client.post("/v1/predict", content=b"RIFFxxxx", headers={"content-type": "audio/wav"})
    assert bad.status_code == 422 and "not a readable WAV" in bad.json()["detail"]


@pytest.mark.parametrize(
    "front_end",
    [None, "13 MFCC per frame, as shipped; no speaker ids (splits by class)"],
    ids=["imported-arrays", "old-default"],
)
def test_a_wav_to_a_model_without_a_front_end_is_refused_in_one_line(
    exported, tmp_path, recordings, front_end
):
    """A card that records no front end (arrays imported ready-made; the old default, whose
    card described its MFCCs in words) cannot turn a WAV into frames: one line that names the
    file and says what to pass instead; exit 2 from predict, 422 from serve, no traceback."""
    import shutil
    import zipfile

    from fastapi.testclient import TestClient

    from cmkd_core.deploy import OnnxStudent
    from cmkd_core.deploy.http import create_app

    model = tmp_path / "student.onnx"
    shutil.copy(exported["model"], model)
    card = {"classes": exported["classes"], "front_end": front_end}
    (tmp_path / "model_card.json").write_text(json.dumps(card))
    wav = zipfile.ZipFile(recordings).read("recordings/7_theo_3.wav")
    (tmp_path / "seven.wav").write_bytes(wav)
    done = _cli("predict", str(model), str(tmp_path / "seven.wav"))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "seven.wav: this model takes arrays, not audio" in lines[0]
    assert "pass a .npy file of shape (T, 13) float32 instead" in lines[0]
    client = TestClient(create_app(OnnxStudent(model), Limits()))
    reply = client.post("/v1/predict", content=wav, headers={"content-type": "audio/wav"})
    assert reply.status_code == 422 and "takes arrays, not audio" in reply.json()["detail"]


def test_a_card_whose_front_end_has_unknown_settings_is_refused_at_load(exported, tmp_path):
    import shutil

    model = tmp_path / "student.onnx"
    shutil.copy(exported["model"], model)
    card = {"classes": exported["classes"], "front_end": {"kind": "audio", "hop": 3}}
    (tmp_path / "model_card.json").write_text(json.dumps(card))
    np.save(tmp_path / "x.npy", np.zeros((30, 13), np.float32))
    done = _cli("predict", str(model), str(tmp_path / "x.npy"))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "model_card.json: its front_end cannot be used: audio front end: unknown" in done.stderr


# Requests that would cost far more than their size, and slow clients: each is refused early,
# the server's memory stays within a few bodies and /healthz keeps answering (docs/reliability.md).

BODY_LIMIT = 8 << 20  # the default max_body_bytes, which the hardened server keeps
MEMORY_BOUND = 3 * BODY_LIMIT  # the most one refused request may add to the server's RSS
SLOW_S = 2.0  # header and body timeouts of the hardened server
CLOSE_GRACE_S = 30.0  # past SLOW_S, for a loaded machine; the test ends once all are closed


@pytest.fixture(scope="module")
def hardened(exported):
    """The app under :func:`serve` (header timeout, keep-alive) on a free loopback port: the
    default body limit, max_batch 8, max_length 300, 2 s header and body timeouts."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = (
        "import sys\n"
        "from cmkd_core.deploy import Limits, OnnxStudent\n"
        "from cmkd_core.deploy.http import create_app, serve\n"
        f"app = create_app(OnnxStudent(sys.argv[1]), Limits(8, 300), body_timeout_s={SLOW_S})\n"
        f"serve(app, '127.0.0.1', int(sys.argv[2]), header_timeout_s={SLOW_S})\n"
    )
    with _serving([sys.executable, "-c", script, str(exported["model"]), str(port)], port) as c:
        yield c


RESPONSIVE_S = 5.0
"""Longest wait for ``/healthz``, or for a refusal, while bad requests are refused. On a quiet
2-core machine both take milliseconds (under 1 s, as the issue asked); before these checks a
bad request stalled ``/healthz`` for 9-58 s. 5 s tells the two apart and still holds on a CI
machine running other work (a fresh-clone CI beside two CPU hogs measured 1.08 s)."""


def _refused_while_watched(server, send, seconds: float = 1.0) -> tuple[list, float, float]:
    """Send a bad request once to warm up, then again and again for ``seconds`` from a thread
    while /healthz is asked every 20 ms: the responses, the slowest /healthz (s) and the growth
    of the server's resident memory (bytes) over the run, peak included."""
    import psutil

    process = psutil.Process(server.server_pid)
    send()  # first use: worker threads, imports
    before = peak = process.memory_info().rss
    deadline = time.monotonic() + seconds

    def repeat() -> list:
        responses = [send()]
        while time.monotonic() < deadline:
            responses.append(send())
        return responses

    slowest = 0.0
    with ThreadPoolExecutor(1) as pool, httpx.Client(base_url=server.base_url, timeout=5) as probe:
        future = pool.submit(repeat)
        while True:
            start = time.monotonic()
            assert probe.get("/healthz").status_code == 200
            slowest = max(slowest, time.monotonic() - start)
            peak = max(peak, process.memory_info().rss)
            if future.done():
                break
            time.sleep(0.02)
        responses = future.result()
    return responses, slowest, max(peak, process.memory_info().rss) - before


def test_a_compressed_npz_declaring_millions_of_frames_is_refused_from_its_header(hardened):
    """An npz of ~200 KB whose ``x`` inflates to 208 MB (4M frames): 413 naming ``x`` and its
    declared shape, read from the .npy header before anything is decompressed."""
    bomb = _declared_npz((4_000_000, 13), zeros=4_000_000 * 13 * 4)
    assert len(bomb) < 1 << 20

    def send() -> httpx.Response:
        return hardened.post(
            "/v1/predict", content=bomb, headers={"content-type": "application/x-npz"}
        )

    responses, slowest, growth = _refused_while_watched(hardened, send)
    for response in responses:
        assert response.status_code == 413
        assert response.json()["detail"].startswith("x: declared shape (4000000, 13): 4000000")
    assert slowest < RESPONSIVE_S, f"slowest /healthz {slowest:.2f} s"
    assert growth < MEMORY_BOUND, f"server RSS grew {growth / 2**20:.0f} MiB"


def test_a_million_tiny_json_samples_are_counted_before_parsing(hardened):
    """7 MB of JSON holding 1M one-number samples: 413 naming max_batch at once (its arrays are
    counted before parsing, no sample becomes an array) while /healthz answers within 1 s."""
    body = b'{"inputs": [' + b",".join([b"[[0]]"] * 1_000_000) + b"]}"
    assert len(body) < BODY_LIMIT

    def send() -> httpx.Response:
        return hardened.post(
            "/v1/predict", content=body, headers={"content-type": "application/json"}
        )

    responses, slowest, growth = _refused_while_watched(hardened, send)
    for response in responses:
        assert response.status_code == 413 and "max_batch 8" in response.json()["detail"]
        assert response.elapsed.total_seconds() < RESPONSIVE_S
    assert slowest < RESPONSIVE_S, f"slowest /healthz {slowest:.2f} s"
    assert growth < MEMORY_BOUND, f"server RSS grew {growth / 2**20:.0f} MiB"
    # Nine samples get past the count and are refused by number, before any becomes an array.
    nine = hardened.post("/v1/predict", json={"inputs": [[[0.0] * 13]] * 9})
    assert nine.status_code == 413 and nine.json()["detail"] == "inputs: batch of 9 > max_batch 8"


def _probabilities_are_finite(response: httpx.Response) -> bool:
    for prediction in response.json()["predictions"]:
        values = list(prediction["probabilities"].values())
        if not all(isinstance(v, float | int) and np.isfinite(v) for v in values):
            return False
    return True


def test_no_200_with_a_non_finite_probability(server, exported):
    """float64 1e300 is infinite once cast to float32: 422 naming the sample. The largest
    float32 values: 422, or 200 with finite probabilities, never a null one."""
    good = exported["samples"][0].astype(np.float64)
    batch = np.stack([good, np.full(good.shape, 1e300)])
    huge = server.post(
        "/v1/predict", content=_npy(batch), headers={"content-type": "application/x-npy"}
    )
    assert huge.status_code == 422 and huge.json()["detail"].startswith("inputs[1]: contains NaN")
    for value in (3e38, -3e38, 1e30):
        x = np.full((20, 13), value, np.float32)
        response = server.post(
            "/v1/predict", content=_npy(x), headers={"content-type": "application/x-npy"}
        )
        if response.status_code == 200:
            assert _probabilities_are_finite(response), response.text
        else:
            assert response.status_code == 422, response.text
            assert response.json()["detail"].startswith("inputs[0]: ")
    assert len(_good(server, exported)) == 4


def test_non_finite_logits_are_refused_naming_the_sample(exported):
    """Whatever the input, a non-finite logit is an InputError naming its sample, never a
    prediction with NaN probabilities."""
    from cmkd_core.deploy import InputError, OnnxStudent

    student = OnnxStudent(exported["model"])
    samples = exported["samples"][:3]
    real = student.logits(samples)
    student.logits = lambda s: np.where(np.arange(len(s))[:, None] == 2, np.inf, real)
    with pytest.raises(InputError, match=r"^c\.npy: the model's output is not finite"):
        student.predict(samples, names=["a.npy", "b.npy", "c.npy"])


def test_npz_members_over_the_byte_bound_are_refused_from_their_header(exported):
    """Where the limits allow long sequences, an array declaring more than 4x max_body_bytes is
    refused (413, naming the member and its shape) before it is read; so is a ``lengths``
    declaring another shape than one per sample (422)."""
    from fastapi.testclient import TestClient

    from cmkd_core.deploy import OnnxStudent
    from cmkd_core.deploy.http import create_app

    app = create_app(OnnxStudent(exported["model"]), Limits(8, 10**9), max_body_bytes=100_000)
    client = TestClient(app)
    npz = {"content-type": "application/x-npz"}
    big = client.post("/v1/predict", content=_declared_npz((1, 10**6, 13)), headers=npz)
    assert big.status_code == 413, big.text
    assert big.json()["detail"].startswith("x: declared shape (1, 1000000, 13) of float32")
    assert "max_body_bytes" in big.json()["detail"]
    buffer = io.BytesIO()
    np.savez(buffer, x=np.zeros((2, 10, 13), np.float32), lengths=np.ones(5_000_000, np.int8))
    lengths = client.post("/v1/predict", content=buffer.getvalue(), headers=npz)
    assert lengths.status_code == 413  # the body itself is over 100 kB
    buffer = io.BytesIO()
    np.savez_compressed(
        buffer, x=np.zeros((2, 10, 13), np.float32), lengths=np.ones(5_000_000, np.int8)
    )
    lengths = client.post("/v1/predict", content=buffer.getvalue(), headers=npz)
    assert lengths.status_code == 422, lengths.text
    assert lengths.json()["detail"].endswith("not declared shape (5000000,)")
    many = io.BytesIO()
    with zipfile.ZipFile(many, "w") as archive:
        for i in range(20):
            archive.writestr(f"m{i}.npy", b"")
    members = client.post("/v1/predict", content=many.getvalue(), headers=npz)
    assert members.status_code == 422 and "more than 16 members" in members.json()["detail"]


def _closed(sock: socket.socket) -> bool:
    """Whether the server closed ``sock`` (a 408 or 400 before closing counts as closed)."""
    try:
        data = sock.recv(4096)
    except (BlockingIOError, TimeoutError):
        return False
    except OSError:
        return True
    return data == b"" or data.startswith(b"HTTP/1.1 4")


def test_connections_trickling_headers_are_closed_and_health_answers(hardened):
    """50 connections sending a request's header lines one every 0.3 s, and one kept-alive
    connection doing the same for its second request, are all closed by the server after the
    2 s header timeout (on a quiet machine within 1.5 s of it; the test allows
    :data:`CLOSE_GRACE_S` for a loaded one), while /healthz keeps answering."""
    socks = []
    try:
        for _ in range(50):
            sock = socket.create_connection(("127.0.0.1", hardened.port), timeout=5)
            sock.sendall(b"POST /v1/predict HTTP/1.1\r\nhost: 127.0.0.1\r\n")
            socks.append(sock)
        kept = socket.create_connection(("127.0.0.1", hardened.port), timeout=5)
        socks.append(kept)
        kept.sendall(b"GET /healthz HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n")
        assert kept.recv(4096).startswith(b"HTTP/1.1 200")
        kept.sendall(b"GET /healthz HTTP/1.1\r\n")
        start = time.monotonic()
        for sock in socks:
            sock.setblocking(False)
        open_socks, slowest = set(range(len(socks))), 0.0
        while open_socks and time.monotonic() - start < SLOW_S + CLOSE_GRACE_S:
            for i in list(open_socks):
                try:
                    socks[i].send(b"x-slow: 1\r\n")
                except OSError:
                    open_socks.discard(i)
                    continue
                if _closed(socks[i]):
                    open_socks.discard(i)
            asked = time.monotonic()
            assert hardened.get("/healthz", timeout=5).status_code == 200
            slowest = max(slowest, time.monotonic() - asked)
            time.sleep(0.3)
        assert not open_socks, f"{len(open_socks)} connections still open"
        assert slowest < RESPONSIVE_S, f"slowest /healthz {slowest:.2f} s"
        assert time.monotonic() - start > SLOW_S - 1.0  # closed by the timeout, not at once
    finally:
        for sock in socks:
            sock.close()


def test_a_stalled_body_gets_408_and_endless_headers_431(hardened):
    """A body that stops arriving: 408 after the body timeout. Headers past 64 KiB: 431."""
    with socket.create_connection(
        ("127.0.0.1", hardened.port), timeout=SLOW_S + CLOSE_GRACE_S
    ) as sock:
        sock.sendall(
            b"POST /v1/predict HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
            b"content-length: 1000\r\n\r\n{"
        )
        start = time.monotonic()
        reply = sock.recv(4096)
        while b"body_timeout_s" not in reply and (more := sock.recv(4096)):
            reply += more  # the body may come in a segment of its own
        assert reply.startswith(b"HTTP/1.1 408") and b"body_timeout_s" in reply
        assert SLOW_S - 0.5 < time.monotonic() - start < SLOW_S + CLOSE_GRACE_S
    with socket.create_connection(
        ("127.0.0.1", hardened.port), timeout=SLOW_S + CLOSE_GRACE_S
    ) as sock:
        # The server answers 431 and closes at once; when its close overtakes the client's
        # last bytes, TCP resets the connection and the 431 may be lost: ended either way.
        try:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nx-long: " + b"a" * (70 << 10))
            reply = sock.recv(4096)
        except ConnectionResetError:
            reply = b""
        assert reply.startswith(b"HTTP/1.1 431") or reply == b"", reply[:100]
    assert hardened.get("/healthz").status_code == 200


def test_a_wav_whose_rate_or_length_cannot_fit_is_refused_before_its_frames(exported, tmp_path):
    """A WAV at 1 Hz would be resampled 8,000-fold: 413 naming max_length before any frame is
    computed; a rate past 768 kHz: 422. A clip of exactly max_length frames still gets its 200."""
    import shutil

    from fastapi.testclient import TestClient
    from scipy.io import wavfile

    from cmkd_core.deploy import OnnxStudent
    from cmkd_core.deploy.http import create_app
    from cmkd_core.frontend import AudioFrontEnd

    model = tmp_path / "student.onnx"
    shutil.copy(exported["model"], model)
    front = AudioFrontEnd(sample_rate=8000, features="mfcc", n_mfcc=13)
    card = {"classes": exported["classes"], "front_end": front.to_json()}
    (tmp_path / "model_card.json").write_text(json.dumps(card))
    client = TestClient(create_app(OnnxStudent(model), Limits(8, 300)))
    cases = [
        (8000, 200 + 299 * 80, 200, "predictions"),  # 25 ms windows every 10 ms: 300 frames
        (8000, 200 + 300 * 80, 413, "inputs[0]: 301 frames > max_length 300"),
        (1, 100_000, 413, "frames or more > max_length 300"),
        (10**6, 100_000, 422, "sample rate 1000000 Hz"),
    ]
    for rate, size, status, message in cases:
        wav = io.BytesIO()
        wavfile.write(wav, rate, np.zeros(size, np.int16))
        start = time.monotonic()
        reply = client.post(
            "/v1/predict", content=wav.getvalue(), headers={"content-type": "audio/wav"}
        )
        assert reply.status_code == status and message in reply.text, reply.text
        assert time.monotonic() - start < 2
