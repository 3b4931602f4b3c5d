"""A speaker the student never trained on, as WAV files, through ``cmkd predict`` on the
exported ONNX student: its accuracy against the test accuracy ``cmkd run`` printed.

    python bench/heldout.py [--root .] [--speaker NAME]

Takes the project's last run (``data/prepared/student/dataset.json`` says which speakers were
held out; the default speaker is the test speaker), writes that speaker's 500 recordings from
``data/raw`` as WAV files to a temporary folder named like a user's (``seven_1.wav``...), runs
``cmkd predict data/export/student.onnx FOLDER --json`` and compares each answer with the
digit the file's name says. Prints a table; writes ``bench/results/heldout.json``
(``--out`` elsewhere).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import yaml

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def heldout(root: Path, speaker: str | None) -> dict:
    """Run the held-out speaker's WAV files through ``cmkd predict`` in project ``root``."""
    meta = json.loads((root / "data/prepared/student/dataset.json").read_text())
    speakers = meta.get("extra", {}).get("speakers")
    if not speakers:
        raise SystemExit(f"{root}: the student was not built from the FSDD recordings")
    speaker = speaker or speakers["test"]
    params = yaml.safe_load((root / "params.yaml").read_text())
    archive = root / params["data"].get("recordings", "data/raw/fsdd-recordings-1.0.10.zip")
    with tempfile.TemporaryDirectory() as folder, zipfile.ZipFile(archive) as zipped:
        truth = {}
        for name in zipped.namelist():
            parts = Path(name).stem.split("_")
            if name.endswith(".wav") and len(parts) == 3 and parts[1] == speaker:
                file = f"{WORDS[int(parts[0])]}_{parts[2]}.wav"
                (Path(folder) / file).write_bytes(zipped.read(name))
                truth[file] = parts[0]
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "cmkd_app.cli",
                "predict",
                "data/export/student.onnx",
                folder,
                "--json",
            ],
            cwd=root,
            capture_output=True,
            text=True,
        )
    if done.returncode != 0:
        raise SystemExit(f"cmkd predict failed ({done.returncode}): {done.stderr.strip()}")
    answers = {Path(r["input"]).name: r for r in json.loads(done.stdout)}
    right = sum(answers[f]["class"] == digit for f, digit in truth.items())
    metrics = json.loads((root / "data/evaluate/metrics.json").read_text())
    printed = metrics["student"]["test_accuracy"]
    return {
        "command": "python bench/heldout.py",
        "speaker": speaker,
        "role": "trained on" if speaker in speakers["train"] else "never trained on",
        "files": len(truth),
        "accuracy": right / len(truth),
        "printed_test_accuracy": printed,
        "difference_points": round(100 * (right / len(truth) - printed), 2),
        "flagged_unusual": sum(bool(r.get("unusual")) for r in answers.values()),
    }


def main(argv: list[str] | None = None) -> int:
    """Print the table and write the JSON; exit 0."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=".")
    parser.add_argument("--speaker", default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    root = Path(args.root).resolve()
    result = heldout(root, args.speaker)
    print(
        f"speaker {result['speaker']} ({result['role']}): {result['files']} WAV files through "
        f"cmkd predict: accuracy {result['accuracy']:.4f}; cmkd run printed test accuracy "
        f"{result['printed_test_accuracy']:.4f} ({result['difference_points']:+.2f} points); "
        f"{result['flagged_unusual']} flagged unusual"
    )
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / "heldout.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
