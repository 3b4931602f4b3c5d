"""Choose the default's audio front end on validation: each candidate setting turns the FSDD
recordings into frames, and ``ce`` and ``sinkhorn_ssl`` (the default's main candidates) are
trained on them against one teacher bank, with the default's budget (10 labelled clips per
class), speaker-independent splits and step budget. The score is the better of the two
methods' validation accuracy per seed (what ``auto`` ships), meaned over seeds; test accuracy
is printed too but chooses nothing.

    python bench/frontend.py [--seeds 0 1] [--resume] [--only NAME ...]

Writes ``bench/results/frontend.json`` and ``.md``; each finished run is appended to
``bench/results/frontend.runs.jsonl`` first, and ``--resume`` skips the runs found there.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cmkd_core.benchmark.plan import Run, build_bank, in_memory, run_one  # noqa: E402
from cmkd_core.config import DistillParams, TeacherParams  # noqa: E402
from cmkd_core.data.defaults import image_dataset  # noqa: E402
from cmkd_core.data.fsdd import (  # noqa: E402
    RECORDINGS,
    held_out_speakers,
    read_recordings,
    recordings_dataset,
)
from cmkd_core.frontend import AudioFrontEnd  # noqa: E402

BASE = AudioFrontEnd(sample_rate=8000, features="mfcc", n_mels=26, n_mfcc=13)
CANDIDATES = {
    "mfcc13": BASE,
    "mfcc13_mels40": replace(BASE, n_mels=40),
    "mfcc20": replace(BASE, n_mfcc=20),
    "logmel26": replace(BASE, features="logmel"),
    "logmel40": replace(BASE, features="logmel", n_mels=40),
    "mfcc13_win32_hop16": replace(BASE, win_ms=32.0, hop_ms=16.0),
    "mfcc13_preemph": replace(BASE, preemphasis=0.97),
    "mfcc13_trim30": replace(BASE, trim_db=30.0),
    "mfcc13_cmn": replace(BASE, normalise="mean"),
    "mfcc13_cmvn": replace(BASE, normalise="meanvar"),
    "logmel26_cmn": replace(BASE, features="logmel", normalise="mean"),
    "mfcc13_trim30_cmn": replace(BASE, trim_db=30.0, normalise="mean"),
    "mfcc13_preemph_cmn": replace(BASE, preemphasis=0.97, normalise="mean"),
    "mfcc20_cmn": replace(BASE, n_mfcc=20, normalise="mean"),
}
METHODS = ("ce", "sinkhorn_ssl")
OUT = ROOT / "bench" / "results"


def main(argv: list[str] | None = None) -> int:
    """Run the sweep, print the table, write the JSON and Markdown; exit 0."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--only", nargs="+", default=list(CANDIDATES))
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args(argv)
    runs_file = OUT / "frontend.runs.jsonl"
    done = {}
    if args.resume and runs_file.is_file():
        for line in runs_file.read_text().splitlines():
            r = json.loads(line)
            done[(r["front_end_name"], r["seed"], r["method"])] = r
    elif runs_file.exists():
        runs_file.unlink()
    recordings = read_recordings(ROOT / RECORDINGS)
    teacher = in_memory("digits", *image_dataset(0.2, 0.2, 0))
    bank, _ = build_bank(teacher, TeacherParams(device="cpu"))
    distill = DistillParams(device="cpu")
    for name in args.only:
        for seed in args.seeds:
            todo = [m for m in METHODS if (name, seed, m) not in done]
            if not todo:
                continue
            val, test = held_out_speakers(seed, None, None)
            student = in_memory(
                "fsdd", *recordings_dataset(recordings, CANDIDATES[name], val, test)
            )
            for method in todo:
                run = Run(0, "digits->fsdd", 10, seed, "unpaired", method, "")
                record = run_one(run, student, bank, distill)
                record.update(front_end_name=name, front_end=CANDIDATES[name].to_json())
                done[(name, seed, method)] = record
                with runs_file.open("a") as out:
                    out.write(json.dumps(record, sort_keys=True) + "\n")
                print(f"{name:22s} seed {seed} {method:13s} val {record['val_accuracy']:.4f}")
    write_summary([r for r in done.values() if r["front_end_name"] in args.only], args.seeds)
    return 0


def write_summary(records: list[dict], seeds: list[int]) -> None:
    """The table by candidate: per method val/test mean and std, and the auto-like score."""
    rows = []
    for name in CANDIDATES:
        mine = [r for r in records if r["front_end_name"] == name]
        if not mine:
            continue
        row = {"front_end_name": name, "front_end": mine[0]["front_end"]}
        for method in METHODS:
            for split in ("val", "test"):
                values = [r[f"{split}_accuracy"] for r in mine if r["method"] == method]
                row[f"{method}_{split}"] = _mean_std(values)
        best = []
        for seed in seeds:
            by_method = {r["method"]: r for r in mine if r["seed"] == seed}
            if by_method:  # ties to ce, as auto
                chosen = max(METHODS, key=lambda m: (by_method[m]["val_accuracy"], m == "ce"))
                best.append((by_method[chosen]["val_accuracy"], by_method[chosen]["test_accuracy"]))
        row["auto_val"] = _mean_std([v for v, _ in best])
        row["auto_test"] = _mean_std([t for _, t in best])
        rows.append(row)
    rows.sort(key=lambda r: -r["auto_val"][0])
    lines = [
        "| front end | ce val | sinkhorn_ssl val | auto val | auto test |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        cells = [r["ce_val"], r["sinkhorn_ssl_val"], r["auto_val"], r["auto_test"]]
        lines.append(f"| {r['front_end_name']} | " + " | ".join(_fmt(c) for c in cells) + " |")
    table = "\n".join(lines)
    print(table)
    header = (
        "# Front end of the default student, chosen on validation\n\n"
        f"`python bench/frontend.py --seeds {' '.join(map(str, seeds))} --resume`; seeds rotate "
        "the held-out speakers (seed s: test speaker s, validation speaker s+1, of george, "
        "jackson, lucas, nicolas, theo, yweweler); 10 labelled clips per class; mean ± std over "
        "seeds. Sorted by auto val (what chooses); test is shown, never used.\n\n"
    )
    (OUT / "frontend.md").write_text(header + table + "\n")
    (OUT / "frontend.json").write_text(json.dumps({"seeds": seeds, "rows": rows}, indent=2) + "\n")


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return (float("nan"), float("nan"))
    return (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0)


def _fmt(pair: tuple[float, float]) -> str:
    return f"{pair[0]:.4f} ± {pair[1]:.4f}"


if __name__ == "__main__":
    sys.exit(main())
