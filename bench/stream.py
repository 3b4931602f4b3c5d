"""Peak memory of import and validation at 1x and 10x the data: the converters stream.

    python bench/stream.py [--base-mb 100] [--wav-clips 300]

For each input kind, makes a dataset of about ``--base-mb`` MB (WAV: ``--wav-clips`` one-second
clips) and one 10 times larger in a scratch folder, then converts each with the same code as
``cmkd import`` and validates the result with the same code as the ``validate`` stage, in a
fresh process whose peak resident memory (``ru_maxrss``) is read at the end. Inputs:

- ``sequences``: a ``.npy`` of frames ``(total_frames, 40)`` plus a labels CSV with a
  ``length`` column (clips of 100 to 300 frames, like 1-3 s of log-mel);
- ``images``: a ``.npy`` of 64 x 64 float32 images;
- ``wav``: a folder of 16 kHz mono WAV files through the MFCC front end.

The target (issue 5): the 10x conversion peaks within 1.2x of the 1x one. Prints a table and
writes ``bench/results/stream.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from scipy.io import wavfile  # noqa: E402

from cmkd_core.data import write_text_atomic  # noqa: E402
from cmkd_core.data.npyio import NpyWriter  # noqa: E402

CHILD = """
import json, resource, sys, time
from pathlib import Path
from cmkd_core.data import check_dataset
from cmkd_core.data.importers import import_arrays, import_wav
from cmkd_core.frontend import AudioFrontEnd
kind, src, labels, out = sys.argv[1:5]
start = time.perf_counter()
if kind == "wav":
    import_wav(src, labels, out, name="bench", front_end=AudioFrontEnd())
else:
    import_arrays(src, labels, out, name="bench", modality=kind)
converted = time.perf_counter()
ds = check_dataset(out)
print(json.dumps({
    "samples": len(ds.manifest),
    "convert_s": converted - start,
    "validate_s": time.perf_counter() - converted,
    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
}))
"""


def _labels(n: int, classes: int = 10, **columns) -> pd.DataFrame:
    return pd.DataFrame({"label": [f"c{i % classes}" for i in range(n)], **columns})


def make_sequences(folder: Path, megabytes: float, rng: np.random.Generator) -> tuple[Path, Path]:
    lengths = []
    while sum(lengths) * 40 * 4 < megabytes * 1e6:
        lengths.append(int(rng.integers(100, 301)))
    with NpyWriter(folder / "frames.npy", np.float32, (sum(lengths), 40)) as out:
        for n in lengths:
            out.write(rng.standard_normal((n, 40), dtype=np.float32))
    _labels(len(lengths), length=lengths).to_csv(folder / "labels.csv", index=False)
    return folder / "frames.npy", folder / "labels.csv"


def make_images(folder: Path, megabytes: float, rng: np.random.Generator) -> tuple[Path, Path]:
    n = int(megabytes * 1e6 // (64 * 64 * 4))
    with NpyWriter(folder / "images.npy", np.float32, (n, 64, 64)) as out:
        for start in range(0, n, 1000):
            out.write(rng.random((min(1000, n - start), 64, 64), dtype=np.float32))
    _labels(n).to_csv(folder / "labels.csv", index=False)
    return folder / "images.npy", folder / "labels.csv"


def make_wavs(folder: Path, clips: int, rng: np.random.Generator) -> tuple[Path, Path]:
    t = np.arange(16000) / 16000
    names = []
    for i in range(clips):
        tone = 0.2 * np.sin(2 * np.pi * rng.uniform(100, 3000) * t) + 0.01 * rng.normal(size=t.size)
        names.append(f"clip{i:06d}.wav")
        wavfile.write(folder / names[-1], 16000, (tone * 32767).astype(np.int16))
    _labels(clips, file=names).to_csv(folder / "labels.csv", index=False)
    return folder, folder / "labels.csv"


def measure(kind: str, src: Path, labels: Path, out: Path) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, kind, str(src), str(labels), str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def input_mb(src: Path) -> float:
    files = [src] if src.is_file() else list(src.glob("*.wav"))
    return sum(f.stat().st_size for f in files) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base-mb", type=float, default=100.0)
    parser.add_argument("--wav-clips", type=int, default=300)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "stream"))
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    for kind in ("sequences", "images", "wav"):
        results = {}
        for scale in (1, 10):
            scratch = Path(tempfile.mkdtemp(prefix=f"cmkd-stream-{kind}-"))
            try:
                if kind == "sequences":
                    src, labels = make_sequences(scratch, args.base_mb * scale, rng)
                elif kind == "images":
                    src, labels = make_images(scratch, args.base_mb * scale, rng)
                else:
                    src, labels = make_wavs(scratch, args.wav_clips * scale, rng)
                modality = {"sequences": "audio", "images": "image", "wav": "wav"}[kind]
                result = measure(modality, src, labels, scratch / "dataset")
                result["input_mb"] = input_mb(src)
                results[scale] = result
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
            print(f"{kind} x{scale}: {results[scale]}", flush=True)
        ratio = results[10]["peak_rss_mb"] / results[1]["peak_rss_mb"]
        rows.append({"input": kind, "x1": results[1], "x10": results[10], "ratio": ratio})
    lines = [
        "| input | 1x input MB | 10x input MB | 1x peak MB | 10x peak MB | 10x / 1x peak "
        "| 10x convert + validate s | target <= 1.2 |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        a, b = r["x1"], r["x10"]
        lines.append(
            f"| {r['input']} | {a['input_mb']:.0f} | {b['input_mb']:.0f} | {a['peak_rss_mb']:.0f} "
            f"| {b['peak_rss_mb']:.0f} | {r['ratio']:.3f} "
            f"| {b['convert_s']:.1f} + {b['validate_s']:.1f} "
            f"| {'met' if r['ratio'] <= 1.2 else 'MISSED'} |"
        )
    table = "\n".join(lines)
    print(table)
    machine = f"{platform.machine()}, {__import__('os').cpu_count()} cores"
    write_text_atomic(
        args.out + ".json",
        json.dumps({"machine": machine, "args": vars(args), "rows": rows}, indent=1) + "\n",
    )
    write_text_atomic(
        args.out + ".md",
        f"Peak memory of import + validation (`python bench/stream.py`, {machine})\n\n"
        + table
        + "\n",
    )


if __name__ == "__main__":
    main()
