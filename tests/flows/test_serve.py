"""``cmkd predict`` and ``cmkd serve`` on a real exported student: a real server process on a
free loopback port, a real HTTP client, every kind of bad request, and no torch at serve time."""

from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from cmkd_core.data import check_pair
from cmkd_core.deploy import Limits
from cmkd_core.distill import extract_bank
from cmkd_core.distill.recipes import fit_student, fit_teacher
from cmkd_core.export import export_onnx

ROOT = Path(__file__).resolve().parents[2]
LIMITS = ["--max-batch", "8", "--max-length", "300", "--max-body-bytes", "400000"]


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
    x, lengths = (t.numpy() for t in test.inputs)
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
        [sys.executable, "-m", "flows.cli", *args], cwd=ROOT, capture_output=True, text=True
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
    assert text.returncode == 0 and text.stdout.split("\t")[1] == rows[0]["class"]


def test_predict_refuses_bad_input_with_exit_2(exported, tmp_path):
    np.save(tmp_path / "bad.npy", np.zeros((30, 12), np.float32))
    done = _cli("predict", str(exported["model"]), str(tmp_path / "bad.npy"))
    assert done.returncode == 2
    assert "bad.npy: shape (30, 12), expected ('T', 13)" in done.stderr
    (tmp_path / "a.wav").write_bytes(b"RIFF")
    wav = _cli("predict", str(exported["model"]), str(tmp_path / "a.wav"))
    assert wav.returncode == 2 and "records no audio front end" in wav.stderr
    missing = _cli("predict", str(tmp_path / "none.onnx"), str(tmp_path / "bad.npy"))
    assert missing.returncode == 2 and "none.onnx: no such model file" in missing.stderr


@pytest.fixture(scope="module")
def server(exported):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "flows.cli", "serve", str(exported["model"])]
    process = subprocess.Popen(
        [*command, "--port", str(port), *LIMITS],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
    try:
        for _ in range(300):
            try:
                if client.get("/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        else:
            pytest.fail(f"server did not start: {process.stdout.read()}")
        client.server_pid = process.pid  # for the load test's memory readings
        yield client
    finally:
        client.close()
        process.terminate()
        process.wait(timeout=30)


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
            return ok and response.json()["predictions"][0]["class"] == expected[index]
        kwargs, status, message = bad[index][1]
        response = client.post("/v1/predict", **kwargs)
        return response.status_code == status and message in response.json()["detail"]

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
    assert len(results) == 2000 and all(results)
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
from flows.cli import main
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
