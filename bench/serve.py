"""Serving cost of the exported default student: torch eager vs onnxruntime float32 and int8,
and the HTTP server's overhead and throughput on loopback.

    python bench/serve.py [--repeats 200] [--requests 300] [--clients 4]

Needs the pipeline's outputs (the README's first command): ``data/distill`` (the torch
student), ``data/export/student.onnx`` and, if the export stage kept it,
``student.int8.onnx``. Inputs are real test clips. Latency is the median of ``--repeats`` calls
after a warm-up, at batch 1 and 64, on this machine's cores (all engines use their default
threads). The HTTP part starts ``cmkd serve`` on a free loopback port and sends a fixed number
of batch-1 JSON requests, one at a time (median latency: overhead over onnxruntime alone) and
from ``--clients`` threads at once (requests per second). Prints a table and writes
``bench/results/serve.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from cmkd_core.config import load_params  # noqa: E402
from cmkd_core.data import read_dataset, write_text_atomic  # noqa: E402
from cmkd_core.data.tensors import samples_of  # noqa: E402
from cmkd_core.deploy import OnnxStudent  # noqa: E402
from cmkd_core.models.checkpoint import load_classifier  # noqa: E402


def median_ms(call, repeats: int) -> float:
    for _ in range(max(3, repeats // 10)):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def padded(clips: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.array([len(c) for c in clips], dtype=np.int64)
    x = np.zeros((len(clips), lengths.max(), clips[0].shape[1]), np.float32)
    for i, c in enumerate(clips):
        x[i, : len(c)] = c
    return x, lengths


def http_figures(model: Path, clip: np.ndarray, requests: int, clients: int) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "cmkd_app.cli", "serve", str(model), "--port", str(port)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    body = {"inputs": [clip.tolist()]}
    raw = json.dumps(body).encode()
    try:
        with httpx.Client(base_url=url, timeout=30) as client:
            for _ in range(300):
                try:
                    client.get("/healthz")
                    break
                except httpx.TransportError:
                    time.sleep(0.1)
        # Latency through a bare keep-alive connection, so the client adds as little as can be.
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

        def one() -> None:
            connection.request("POST", "/v1/predict", raw, {"content-type": "application/json"})
            reply = connection.getresponse()
            reply.read()
            assert reply.status == 200, reply.status

        latency = median_ms(one, requests)
        connection.close()

        def worker(n: int) -> int:
            with httpx.Client(base_url=url, timeout=30) as own:
                return sum(own.post("/v1/predict", json=body).status_code == 200 for _ in range(n))

        start = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            ok = sum(pool.map(worker, [requests // clients] * clients))
        seconds = time.perf_counter() - start
    finally:
        server.terminate()
        server.wait(timeout=30)
    sent = clients * (requests // clients)
    return {"http_median_ms": latency, "rps": sent / seconds, "ok": ok, "sent": sent}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args(argv)
    method = load_params(ROOT / "params.yaml").distill.method  # the pipeline's outputs (dvc.yaml)
    model, _, _ = load_classifier(ROOT / "data" / "distill" / f"student_{method}.safetensors")
    model.eval()
    dataset = read_dataset(ROOT / "data" / "prepared" / "student")
    test = samples_of(dataset, dataset.rows("test").iloc[:64])
    x64, lengths64 = (t.numpy() for t in test.take(torch.arange(len(test)))[0])
    clips = [x64[i, :n] for i, n in enumerate(lengths64)]
    onnx, int8 = (
        ROOT / "data" / "export" / "student.onnx",
        ROOT / "data" / "export" / "student.int8.onnx",
    )
    engines = {"torch eager": None, "onnxruntime float32": onnx}
    if int8.is_file():
        engines["onnxruntime int8"] = int8
    table = []
    for batch in (1, 64):
        x, lengths = padded(clips[:batch])
        for name, path in engines.items():
            if path is None:
                xt, lt = torch.from_numpy(x), torch.from_numpy(lengths)

                def call(xt=xt, lt=lt):
                    with torch.inference_mode():
                        return model(xt, lt)
            else:
                session = OnnxStudent(path).session

                def call(session=session, x=x, lengths=lengths):
                    return session.run(["logits"], {"x": x, "lengths": lengths})

            repeats = args.repeats if batch == 1 else max(20, args.repeats // 4)
            table.append({"engine": name, "batch": batch, "median_ms": median_ms(call, repeats)})
            print(json.dumps(table[-1]), flush=True)
    http = http_figures(onnx, clips[0], args.requests, args.clients)
    ort_b1 = next(r for r in table if r["engine"] == "onnxruntime float32" and r["batch"] == 1)
    eager_b1 = next(r for r in table if r["engine"] == "torch eager" and r["batch"] == 1)
    http["overhead_ms"] = http["http_median_ms"] - ort_b1["median_ms"]
    ratio = ort_b1["median_ms"] / eager_b1["median_ms"]
    lines = [
        f"Machine: {torch.get_num_threads()} torch threads; model {onnx}",
        "",
        "| engine | batch | median latency ms |",
        "|---|---|---|",
        *[f"| {r['engine']} | {r['batch']} | {r['median_ms']:.3f} |" for r in table],
        "",
        f"onnxruntime float32 / torch eager at batch 1: {ratio:.2f} (target <= 0.5)",
        f"HTTP (loopback, batch 1 JSON, {args.requests} requests): median "
        f"{http['http_median_ms']:.2f} ms, overhead over onnxruntime {http['overhead_ms']:.2f} ms "
        "(target <= 2)",
        f"HTTP throughput with {args.clients} clients: {http['rps']:.0f} requests/s "
        f"({http['ok']}/{http['sent']} OK)",
    ]
    text = "\n".join(lines) + "\n"
    out = Path(args.out)
    payload = {"latency": table, "http": http, "ort_over_eager_batch1": ratio}
    write_text_atomic(out / "serve.json", json.dumps(payload, indent=1) + "\n")
    write_text_atomic(out / "serve.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
