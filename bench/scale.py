"""How far one machine goes: synthetic pairs of N student clips through the real pipeline.

    python bench/scale.py [--sizes 3000 30000 100000] [--work /tmp/cmkd-scale] [--long-clip]

For each N, a fresh copy of the project (``git archive HEAD``) in ``WORK/N`` gets a synthetic
pair written chunk by chunk: N student clips of ``--features`` features x 20-100 frames (a
class mean per class, each frame that mean plus noise; ``--long-clip`` makes one validation clip
100x the longest), and N teacher embeddings of ``--dim`` (class means plus noise) with a
nearest-class-mean head. Both go through ``cmkd import arrays``; params take them
(``data.source: import``, ``teacher.source: embeddings``), ``distill.method: sinkhorn_ssl`` (it
trains the CE-only baseline too) for a fixed ``--steps`` optimiser steps over 10 rounds. Then
each stage runs alone, ``dvc repro --single-item STAGE`` in ``dvc.yaml`` order, while a thread
samples the process tree every 0.2 s (``/proc``): wall seconds, peak resident memory, and of it
the anonymous part (heap, not pages of memory-mapped files, which the kernel can drop); the
stage worker is off (``CMKD_STAGE_WORKER=0``), so each stage is its own process. After the run:
the bytes on disk of the arrays, of ``data/`` (the pair's folders and every output) and of DVC's
cache, each inode counted once (hard links share one). Writes ``scale.json`` and ``scale.md``
under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cmkd_core.data import write_text_atomic  # noqa: E402
from cmkd_core.tensorfile import save_tensors  # noqa: E402

STAGES = ("prepare", "validate", "teacher", "distill", "evaluate", "export")
CLASSES = 10


def _tree(root: int) -> list[int]:
    """``root`` and every process below it."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            parents.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += parents.get(pid, [])
    return found


def _memory(pids: list[int]) -> tuple[int, int]:
    """Summed resident and anonymous resident kB of ``pids``."""
    rss = anon = 0
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                rss += int(line.split()[1])
            elif line.startswith("RssAnon:"):
                anon += int(line.split()[1])
    return rss, anon


def measured(command: list[str], cwd: Path) -> dict:
    """Run ``command`` in ``cwd``; its wall seconds and the peak resident and anonymous GB of
    its process tree (sampled every 0.2 s). Raises on a non-zero exit with its output."""
    start = time.perf_counter()
    env = {**os.environ, "CMKD_STAGE_WORKER": "0"}  # each stage in its own measured process
    process = subprocess.Popen(
        command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    peak = [0, 0]

    def sample() -> None:
        while process.poll() is None:
            rss, anon = _memory(_tree(process.pid))
            peak[0], peak[1] = max(peak[0], rss), max(peak[1], anon)
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output = process.communicate()[0]
    sampler.join()
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {process.returncode}:\n{output[-3000:]}")
    return {
        "seconds": time.perf_counter() - start,
        "peak_rss_gb": peak[0] / 2**20,
        "peak_anon_gb": peak[1] / 2**20,
    }


def disk_gb(*folders: Path) -> float:
    """Bytes allocated under ``folders`` in GB, each inode once; ``data/raw`` and
    ``data/texts`` (files of the project itself, not of the pair) are left out."""
    seen, total = set(), 0
    for folder in folders:
        for path in folder.rglob("*") if folder.exists() else ():
            if {"raw", "texts"} & set(path.relative_to(folder).parts[:1]) and folder.name == "data":
                continue
            if path.is_file() and not path.is_symlink():
                info = path.stat()
                if (info.st_dev, info.st_ino) not in seen:
                    seen.add((info.st_dev, info.st_ino))
                    total += info.st_blocks * 512
    return total / 1e9


def write_pair(raw: Path, n: int, features: int, dim: int, long_clip: bool, seed: int = 0):
    """The synthetic student frames and labels, teacher embeddings, labels and head, written in
    chunks of 10,000 clips (memory does not grow with ``n``). Returns the arrays' bytes."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % CLASSES
    rng.shuffle(labels)
    lengths = rng.integers(20, 101, n)
    split = np.array(["train", "val", "test"])[rng.choice(3, n, p=[0.6, 0.2, 0.2])]
    for c in range(CLASSES):  # every class in every split
        for k, name in enumerate(("train", "val", "test")):
            split[np.flatnonzero(labels == c)[k]] = name
    if long_clip:
        lengths[np.flatnonzero(split == "val")[0]] = 100 * 100
    student_means = rng.normal(size=(CLASSES, features)).astype(np.float32)
    teacher_means = rng.normal(size=(CLASSES, dim)).astype(np.float32)
    raw.mkdir(parents=True, exist_ok=True)
    frames = np.lib.format.open_memmap(
        raw / "frames.npy", "w+", np.float32, (int(lengths.sum()), features)
    )
    embeddings = np.lib.format.open_memmap(raw / "embeddings.npy", "w+", np.float32, (n, dim))
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    for lo in range(0, n, 10_000):
        hi = min(n, lo + 10_000)
        block = rng.normal(scale=2.0, size=(int(offsets[hi] - offsets[lo]), features))
        owner = np.repeat(labels[lo:hi], lengths[lo:hi])
        frames[offsets[lo] : offsets[hi]] = block + student_means[owner]
        noise = rng.normal(scale=3.0, size=(hi - lo, dim))
        embeddings[lo:hi] = noise + teacher_means[labels[lo:hi]]
    frames.flush()
    embeddings.flush()
    ids = [f"c{i:07d}" for i in range(n)]
    table = {"id": ids, "label": labels, "split": split}
    pd.DataFrame({**table, "length": lengths}).to_csv(raw / "student.csv", index=False)
    pd.DataFrame({**table, "id": [f"t{i:07d}" for i in range(n)]}).to_csv(
        raw / "teacher.csv", index=False
    )
    head = teacher_means / np.linalg.norm(teacher_means, axis=1, keepdims=True)
    import torch

    save_tensors(
        {"weight": torch.from_numpy(head), "bias": torch.zeros(CLASSES)},
        raw / "head.safetensors",
        {},
    )
    return frames.nbytes + embeddings.nbytes


def project(work: Path) -> Path:
    """A fresh copy of the committed project in ``work`` (a git repository of its own)."""
    work.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", ROOT, "archive", "HEAD"], capture_output=True, check=True
    )
    subprocess.run(["tar", "-x", "-C", work], input=archive.stdout, check=True)
    for command in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "s"]):
        subprocess.run(command, cwd=work, check=True, capture_output=True)
    return work


def set_params(root: Path, steps: int) -> None:
    """Point params.yaml at the imported pair; a fixed budget in optimiser steps."""
    path = root / "params.yaml"
    params = yaml.safe_load(path.read_text())
    params["data"]["source"] = "import"
    params["teacher"].update(
        source="embeddings", embeddings="data/import/teacher", head="data/import/head.safetensors"
    )
    params["distill"].update(method="sinkhorn_ssl", epochs=10, min_steps=steps)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def run_size(n: int, args: argparse.Namespace) -> dict:
    """One N through import and every stage; the row of the table."""
    root = project(Path(args.work) / str(n))
    raw = root / "raw"
    start = time.perf_counter()
    arrays = write_pair(raw, n, args.features, args.dim, args.long_clip)
    row: dict = {"n": n, "arrays_gb": arrays / 1e9, "generate_s": time.perf_counter() - start}
    cmkd = [sys.executable, "-m", "cmkd_app.cli"]
    imports = {
        "student": [*cmkd, "import", "arrays", "raw/frames.npy", "raw/student.csv"],
        "teacher": [*cmkd, "import", "arrays", "raw/embeddings.npy", "raw/teacher.csv"],
    }
    imports["student"] += ["data/import/student", "--name", "synth", "--modality", "audio"]
    imports["student"] += ["--labelled-per-class", "10"]
    imports["teacher"] += ["data/import/teacher", "--name", "emb", "--modality", "embedding"]
    stages = {}
    for role, command in imports.items():
        stages[f"import {role}"] = measured(command, root)
    (raw / "head.safetensors").rename(root / "data" / "import" / "head.safetensors")
    for name in ("frames.npy", "embeddings.npy"):  # the user's files, once imported
        (raw / name).unlink()
    set_params(root, args.steps)
    dvc = [sys.executable, "-m", "dvc"]
    for stage in STAGES:
        stages[stage] = measured([*dvc, "repro", "--single-item", stage], root)
        print(f"N={n} {stage}: {json.dumps(stages[stage])}", flush=True)
    row["stages"] = stages
    row["disk_gb"] = {
        "import": disk_gb(root / "data" / "import"),
        "data": disk_gb(root / "data"),
        "dvc_cache": disk_gb(root / ".dvc" / "cache"),
        "data_and_cache": disk_gb(root / "data", root / ".dvc" / "cache"),
        "remote": disk_gb(root / ".cmkd" / "dvc-remote"),
    }
    row["metrics"] = json.loads((root / "data" / "evaluate" / "metrics.json").read_text())
    return row


def table(rows: list[dict]) -> str:
    """The markdown table: per N, arrays, per stage wall s / peak RSS / anonymous GB, disk."""
    head = "| N | arrays GB | stage | wall s | peak RSS GB | peak anonymous GB |\n"
    lines = [head, "|---|---|---|---|---|---|\n"]
    for r in rows:
        for k, (stage, m) in enumerate(r["stages"].items()):
            first = (f"{r['n']:,}", f"{r['arrays_gb']:.2f}") if k == 0 else ("", "")
            lines.append(
                f"| {first[0]} | {first[1]} | {stage} | {m['seconds']:.1f} "
                f"| {m['peak_rss_gb']:.2f} | {m['peak_anon_gb']:.2f} |\n"
            )
    lines.append(
        "\n| N | arrays GB | data/import GB | data/ GB | DVC cache GB "
        "| data/ and cache, each inode once, GB | x arrays |\n"
    )
    lines.append("|---|---|---|---|---|---|---|\n")
    for r in rows:
        d = r["disk_gb"]
        lines.append(
            f"| {r['n']:,} | {r['arrays_gb']:.2f} | {d['import']:.2f} | {d['data']:.2f} "
            f"| {d['dvc_cache']:.2f} "
            f"| {d['data_and_cache']:.2f} | {d['data_and_cache'] / r['arrays_gb']:.2f} |\n"
        )
    return "".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", type=int, default=[3000, 30000, 100000])
    parser.add_argument("--features", type=int, default=64)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--steps", type=int, default=300, help="optimiser steps per student")
    parser.add_argument("--long-clip", action="store_true", help="one val clip 100x the longest")
    parser.add_argument("--work", default="/tmp/cmkd-scale")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--name", default="scale")
    args = parser.parse_args(argv)
    rows = []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for n in args.sizes:
        rows.append(run_size(n, args))
        payload = {"command": "python bench/scale.py " + " ".join(argv or sys.argv[1:])}
        payload.update(vars(args), rows=rows)
        write_text_atomic(out / f"{args.name}.json", json.dumps(payload, indent=1) + "\n")
        write_text_atomic(out / f"{args.name}.md", table(rows))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
