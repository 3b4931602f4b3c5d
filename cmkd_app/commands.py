"""What each ``cmkd`` command does once its arguments are parsed (cmkd_app/cli.py). Each
function imports what it needs, so that a command which never trains starts fast."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from cmkd_app.prefect_api import run_flow
from cmkd_app.show import bank_text, summary_text
from tasks.layout import Layout


def _student_geometry(layout: Layout, bank) -> dict | None:
    """The class-similarity diagnostic of ``bank`` against this project's CE-only student, if
    a run has trained one on the prepared student data with the bank's classes."""
    weights = layout.student_weights("ce")
    if not weights.is_file() or len(bank.classes) < 3:
        return None
    from cmkd_core.align.measure import class_geometry
    from cmkd_core.data import check_dataset
    from cmkd_core.models.checkpoint import load_classifier

    model, _, _ = load_classifier(weights)
    try:
        dataset = check_dataset(layout.student_data, classes=list(bank.classes))
    except ValueError:
        return None
    return class_geometry(model, bank, dataset)


def bank_inspect(args: argparse.Namespace, layout: Layout) -> int:
    """``cmkd bank inspect``."""
    from cmkd_core.align.similarity import describe_bank
    from cmkd_core.bank import load_bank

    bank = load_bank(args.path or layout.bank)
    facts = describe_bank(bank)
    facts["class_similarity"] = _student_geometry(layout, bank)
    print(json.dumps(facts, indent=1) if args.json else bank_text(facts))
    return 0


def import_files(args: argparse.Namespace, layout: Layout) -> int:
    """``cmkd import FORMAT SRC LABELS OUT``."""
    from cmkd_core.data.importers import import_arrays, import_images, import_wav
    from cmkd_core.frontend import ImageFrontEnd

    common = {
        "name": args.name,
        "val_fraction": args.val_fraction,
        "test_fraction": args.test_fraction,
        "seed": args.seed,
        "labelled_per_class": args.labelled_per_class,
    }
    if args.format == "wav":
        front_end = _audio_front_end(args)
        out = import_wav(args.source, args.labels, args.out, front_end=front_end, **common)
    elif args.format == "images":
        front_end = ImageFrontEnd(args.height, args.width)
        out = import_images(args.source, args.labels, args.out, front_end=front_end, **common)
    else:
        out = import_arrays(args.source, args.labels, args.out, modality=args.modality, **common)
    samples = len((out / "manifest.csv").read_text().splitlines()) - 1
    print(f"cmkd: wrote {out} ({samples} samples)")
    return 0


def import_layout(args: argparse.Namespace, layout: Layout) -> int:
    """``cmkd import-layout KIND SRC OUT``."""
    from cmkd_core.data.layouts import import_layout as write_layout
    from cmkd_core.frontend import ImageFrontEnd

    written = write_layout(
        args.kind,
        args.source,
        args.out,
        audio=_audio_front_end(args),
        image=ImageFrontEnd(args.height, args.width),
        teacher=args.teacher,
        frames=args.frames,
        val_fraction=args.val_fraction,
        seed=args.seed,
        labelled_per_class=args.labelled_per_class,
    )
    for role, path in written.items():
        samples = len((path / "manifest.csv").read_text().splitlines()) - 1
        print(f"cmkd: wrote {role} {path} ({samples} samples)")
    return 0


def seeds(args: argparse.Namespace, layout: Layout) -> int:
    """``cmkd seeds``."""
    from flows.seeds import run_on_dask

    result = run_on_dask(args.root, args.seeds, args.methods, args.workers, args.address)
    for method, row in result["summary"].items():
        print(
            f"{method:>14}  test accuracy {100 * row['mean']:.2f} +- "
            f"{100 * row['std']:.2f} over seeds {row['seeds']}"
        )
    return 0


def run(args: argparse.Namespace, layout: Layout) -> int:
    """``cmkd run``: the pipeline flow, then the summary."""
    from cmkd_app.console import run_console
    from cmkd_app.stage import STAGE_MODULES
    from flows.pipeline import pipeline
    from tasks.dvc import StageFailedError

    log = run_console(layout.logs, args.verbose)
    print(f"cmkd run: stage, outcome, seconds (full log: {log})", flush=True)
    try:
        result = run_flow(
            pipeline, meanwhile=STAGE_MODULES, root=args.root, push_to_same_disk=args.push
        )
    except StageFailedError as exc:
        print(f"cmkd: {exc}\n  full log: {log}", file=sys.stderr)
        return exc.exit_code
    if result["nothing_to_do"]:
        print("cmkd: nothing to do, every stage is up to date; the last results:")
    onnx = Path(result["onnx"])
    if onnx.is_relative_to(Path.cwd()):
        onnx = onnx.relative_to(Path.cwd())  # as the user would type it
    print(summary_text(result["metrics"], str(onnx)))
    return 0


def push(args: argparse.Namespace, layout: Layout) -> int:
    """``cmkd push``: ``dvc push`` of the project's cached artifacts to its default remote,
    wherever that is (``cmkd run`` skips a remote on the cache's disk)."""
    from dvc.repo import Repo

    with Repo(str(layout.root)) as repo:
        if not repo.config["core"].get("remote"):
            print("cmkd push: no default DVC remote (dvc remote add -d NAME URL)", file=sys.stderr)
            return 2
        print(f"cmkd push: {repo.push()} files pushed")
    return 0


def summary(args: argparse.Namespace, layout: Layout) -> int:
    """``cmkd summary``: the last run's results."""
    metrics = json.loads(layout.metrics.read_text())
    print(summary_text(metrics, str(layout.onnx)))
    return 0


def bench(args: argparse.Namespace, layout: Layout) -> int:
    """``cmkd bench`` (cmkd_app/bench.py)."""
    from cmkd_app.bench import run_benchmark

    return run_benchmark(args, layout)


def _audio_front_end(args: argparse.Namespace):
    """The audio front end the import options describe (exit 2 on a bad setting)."""
    from cmkd_core.frontend import AudioFrontEnd

    try:
        return AudioFrontEnd(
            args.sample_rate,
            args.features,
            args.n_mels,
            args.n_mfcc,
            args.win_ms,
            args.hop_ms,
            args.preemphasis,
            args.trim_db,
            args.normalise,
        )
    except ValueError as exc:
        print(f"cmkd: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


PREDICT_HEADER = "input\tclass\tp(class)\tprobabilities"
"""The first line of ``cmkd predict``'s table: its tab-separated columns."""


def _warn_unusual(student, named: list, predictions: list) -> None:
    """One warning line on stderr per input unlike the training data (its card's check)."""
    for (name, _), p in zip(named, predictions, strict=True):
        if p.unusual is not None:
            limit = student.card["input_check"]["threshold"]
            print(
                f"cmkd: warning: {name}: unlike the training data (distance {p.unusual:.2f} > "
                f"{limit:.2f}, cmkd_core/deploy/novelty.py): its class may be wrong",
                file=sys.stderr,
            )


def predict_or_serve(args: argparse.Namespace) -> int:
    """``cmkd predict`` and ``cmkd serve``: onnxruntime only, no torch, Prefect or DVC."""
    from cmkd_core.deploy import InputError, Limits, ModelError, OnnxStudent, read_inputs

    try:
        threads = getattr(args, "threads", 0)
        student = OnnxStudent(args.model, args.card, threads=threads)
        if args.command == "serve":
            from cmkd_core.deploy.http import create_app, serve

            limits = Limits(max_batch=args.max_batch, max_length=args.max_length)
            app = create_app(student, limits, max_body_bytes=args.max_body_bytes)
            print(f"cmkd: serving {args.model} on http://{args.host}:{args.port}", flush=True)
            serve(app, args.host, args.port)  # with a header timeout: uvicorn has none
            return 0
        named = read_inputs(args.input, student)
        predictions = []
        for start in range(0, len(named), 256):
            chunk = named[start : start + 256]
            predictions += student.predict([x for _, x in chunk], names=[n for n, _ in chunk])
    except (InputError, ModelError) as exc:
        print(f"cmkd: {exc}", file=sys.stderr)
        return 2
    try:
        if args.json:
            pairs = zip(named, predictions, strict=True)
            print(json.dumps([{"input": n, **p.as_json()} for (n, _), p in pairs], indent=1))
        else:
            print(PREDICT_HEADER)
            for (name, _), p in zip(named, predictions, strict=True):
                probs = " ".join(f"{c}:{v:.3f}" for c, v in p.probabilities.items())
                print(f"{name}\t{p.label}\t{p.probabilities[p.label]:.3f}\t{probs}")
        sys.stdout.flush()
        _warn_unusual(student, named, predictions)
    except BrokenPipeError:  # the reader left (``| head``): stop quietly, as cat or grep do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        return 141  # 128 + SIGPIPE, what a shell reports for a tool killed by a closed pipe
    return 0
