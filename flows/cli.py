"""The ``cmkd`` command.

cmkd run              the whole pipeline through DVC (stale stages only), then a summary
cmkd stage NAME       one stage's flow in this process (what dvc.yaml runs)
cmkd summary          print the summary of the last run
cmkd bench            the method benchmark (table and JSON under bench/results)
cmkd bank inspect     classes, counts, feature size and val accuracy of a teacher bank
cmkd import FORMAT SRC LABELS OUT   a contract dataset from your arrays or WAV files
cmkd import-layout KIND SRC OUT   teacher + student datasets from CREMA-D, AVE, VGGSound, RAVDESS
cmkd predict M INPUT  classes of .npy (or .wav) inputs with an exported student (onnxruntime)
cmkd serve M          an HTTP server for an exported student on 127.0.0.1
cmkd seeds            several seeds of the distill stage at once on a Dask cluster
cmkd server           a local Prefect server and its dashboard (SQLite in .cmkd/prefect) on
                      http://127.0.0.1:4200;
                      --stop: stop the background one that cmkd run and cmkd stage share
cmkd deploy           the work pool and the nightly deployment of prefect.yaml (--serve: one
                      process instead); cmkd worker: a process worker that runs it here

Outside a project (no dvc.yaml in --root) the commands that work on one stop at once with
exit status 2 (flows/project.py); predict, serve, import and import-layout work anywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import tasks  # noqa: F401  (Prefect's offline defaults, before Prefect is imported)


def summary_text(metrics: dict, onnx: str) -> str:
    """Human-readable result of a run: teacher, student and CE-only test accuracy. The labelled
    budget is worded by ``metrics["student"]["modality"]`` (clips for audio or video, images)
    or ``["kind"]`` (sequences) where present, else as samples."""
    student, ce = metrics["student"], metrics["ce_only"]
    modality = str(student.get("modality", "")).lower()
    samples = {"audio": "clips", "speech": "clips", "video": "clips", "image": "images"}.get(
        modality, {"sequence": "sequences"}.get(student.get("kind", ""), "samples")
    )
    gain = 100 * metrics["gain_over_ce"]["test_accuracy"]
    method = metrics["method"]
    if "chosen" in metrics:
        method = f"auto: {metrics['chosen']}"
    lines = []
    if "candidates_val_accuracy" in metrics:
        scores = metrics["candidates_val_accuracy"]
        ranked = sorted(scores.items(), key=lambda kv: -kv[1])
        lines = [
            "auto: candidates by validation accuracy (the first is shipped; ties go to ce)",
            *(f"  {name:<16} val {value:.4f}" for name, value in ranked),
            f"  {metrics['chosen']} vs ce on validation: "
            f"{100 * (scores[metrics['chosen']] - scores['ce']):+.2f} points",
        ]
    width = max(31, len(f"shipped student ({method})"))
    return "\n".join(
        [
            *lines,
            "cmkd results (test split, each model at its best validation epoch)",
            f"  {'teacher':<{width}}  test accuracy {metrics['teacher']['test_accuracy']:.4f}",
            f"  {f'shipped student ({method})':<{width}}  test accuracy "
            f"{student['test_accuracy']:.4f}   macro-F1 {student['test_macro_f1']:.4f}",
            f"  {'CE-only student (same budget)':<{width}}  test accuracy "
            f"{ce['test_accuracy']:.4f}   macro-F1 {ce['test_macro_f1']:.4f}",
            f"  shipped vs CE-only on test: {gain:+.2f} points"
            f" ({student['labelled_train']} labelled student {samples})",
            *_geometry_line(metrics.get("class_similarity")),
            f"  ONNX student: {onnx}",
        ]
    )


def _geometry_line(found: dict | None) -> list[str]:
    """The class-similarity diagnostic in one line, with what it means."""
    if not found:
        return []
    r, p = found["correlation"], found["p_value"]
    verdict = (
        "the classes the teacher finds alike, the student finds alike too"
        if r >= 0.3 and p < 0.05
        else "little shared class structure: expect gains from unlabelled data, not semantics"
    )
    shown = "p < 0.001" if p < 0.001 else f"p = {p:.3f}"
    return [f"  class geometry, teacher vs CE-only student: r = {r:+.2f} ({shown}): {verdict}"]


def bank_text(facts: dict) -> str:
    """``cmkd bank inspect`` for people: size, the class order (row ``i`` of the teacher head
    and logit ``i`` of a student are ``classes[i]``), rows per class and split, val accuracy."""
    counts = facts["counts"]
    lines = [
        f"teacher bank: {facts['rows']} rows, {facts['feature_dim']}-d features, "
        f"{len(facts['classes'])} classes",
        f"  teacher head accuracy on the bank's val rows: {facts['val_accuracy']:.4f}"
        if facts["val_accuracy"] is not None
        else "  no val rows",
        "  class order (head rows): "
        + " ".join(f"{i}={c}" for i, c in enumerate(facts["classes"])),
        "  class       train    val   test",
    ]
    for c in facts["classes"]:
        lines.append(
            f"  {c:<10} {counts['train'][c]:>6} {counts['val'][c]:>6} {counts['test'][c]:>6}"
        )
    if "nearest_class" in facts:
        lines.append(
            "  most similar class (cosine of class means in the teacher's space): "
            + ", ".join(f"{c}~{d} {v:.2f}" for c, (d, v) in facts["nearest_class"].items())
        )
    if facts.get("class_similarity"):
        lines += _geometry_line(facts["class_similarity"])
    source = facts["info"].get("source", "trained by the pipeline")
    lines.append(f"  source: {source}")
    return "\n".join(lines)


# What the pipeline's stages import, in the order they need it: imported while the local
# server starts (ensure_server's ``meanwhile``), not after it, and by a stage worker
# (tasks/stage_worker.py) before it serves.
STAGE_MODULES = (
    "dvc.repo",  # status, pull and push (tasks/dvc.py)
    "tasks.data",
    "cmkd_core.bank",
    "tasks.train",
    "torch._dynamo",  # the optimisers' first step imports it
    "tasks.evaluate",
    "tasks.export",
    "torch.onnx._internal.exporter._compat",
)


def _run_flow(function, meanwhile: tuple[str, ...] = (), **kwargs):
    """``function(**kwargs)`` (a flow, or code that runs flows) against the configured Prefect
    API or, if none is, the project's shared local server (flows/local_server.py), not a
    temporary one; ``meanwhile``: modules to import while that server starts."""
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
        temporary_settings,
    )

    updates = {PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}
    if not PREFECT_API_URL.value():
        from flows.local_server import ensure_server

        url, started = ensure_server(meanwhile=meanwhile)
        updates[PREFECT_API_URL] = url
        import logging

        logging.getLogger("cmkd").info(
            "Prefect API: the project's local server at %s (%s); its dashboard: %s",
            url,
            "started now" if started else "already running",
            url.removesuffix("/api"),
        )
    with temporary_settings(updates):
        return function(**kwargs)


def _student_geometry(layout, bank) -> dict | None:
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


def _deploy(args: argparse.Namespace) -> int:
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="cmkd", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the whole pipeline through DVC")
    stage = sub.add_parser("stage", help="run one stage's flow (as dvc.yaml does)")
    stage.add_argument(
        "name", choices=["prepare", "validate", "teacher", "distill", "evaluate", "export"]
    )
    show = sub.add_parser("summary", help="print the last run's results")
    bench = sub.add_parser("bench", help="the method benchmark; writes a table and JSON")
    bench.add_argument("--quick", action="store_true", help="the small grid (under 15 min)")
    bench.add_argument("--pairs", nargs="+", help="pairs to run (default: by --quick)")
    bench.add_argument("--methods", nargs="+", help="methods to run (default: all)")
    bench.add_argument("--budgets", nargs="+", help="labelled per class, or 'all'")
    bench.add_argument("--seeds", type=int, help="number of seeds (0..n-1)")
    bench.add_argument(
        "--controls", nargs="*", help="methods also run with the shuffled teacher (default by grid)"
    )
    bench.add_argument(
        "--prototype-controls",
        nargs="*",
        help="methods also run with random class prototypes (default: sinkhorn_ssl)",
    )
    bench.add_argument("--out", default="bench/results", help="folder for methods*.json/md")
    bench.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="override distill params, e.g. unlabelled=true w_fa=0.3",
    )
    bench.add_argument("--name", help="file name stem of the results (default by --quick)")
    bench.add_argument(
        "--jobs", type=int, help="local Dask workers, one thread each (default: cores; 1: here)"
    )
    bench.add_argument("--address", help="an existing Dask scheduler, e.g. tcp://host:8786")
    bench.add_argument(
        "--resume", action="store_true", help="skip runs already in NAME.runs.jsonl (same params)"
    )
    bench.add_argument(
        "--fresh-teachers", action="store_true", help="retrain the teachers, ignoring the cache"
    )
    importer = sub.add_parser("import", help="write a contract dataset from your own arrays")
    importer.add_argument("format", choices=["arrays", "wav", "images"], help="the input")
    importer.add_argument(
        "source", help="arrays: .npy (memory-mapped) or .npz; wav, images: a folder of files"
    )
    importer.add_argument(
        "labels", help="CSV or parquet: label [, id, split, pair]; length (arrays); file"
    )
    importer.add_argument("out", help="the dataset folder to create (must not exist)")
    importer.add_argument("--name", required=True, help="dataset name")
    importer.add_argument("--modality", default="audio", help="e.g. image, audio, text")
    importer.add_argument("--val-fraction", type=float, default=0.2)
    importer.add_argument("--test-fraction", type=float, default=0.2)
    importer.add_argument("--seed", type=int, default=0, help="split and labelled-budget seed")
    importer.add_argument(
        "--labelled-per-class", type=int, help="student side: write labelled.csv with this many"
    )
    layout_parser = sub.add_parser(
        "import-layout", help="teacher and student datasets from a paper benchmark's layout"
    )
    layout_parser.add_argument("kind", choices=["cremad", "ave", "vggsound", "ravdess"])
    layout_parser.add_argument("source", help="the layout's root folder (docs/data.md)")
    layout_parser.add_argument("out", help="writes OUT/teacher and OUT/student (e.g. data/import)")
    layout_parser.add_argument("--teacher", choices=["visual", "audio"], default="visual")
    layout_parser.add_argument("--frames", type=int, default=1, help="frames per clip")
    layout_parser.add_argument("--val-fraction", type=float, default=0.1, help="if no val split")
    layout_parser.add_argument("--seed", type=int, default=0)
    layout_parser.add_argument("--labelled-per-class", type=int, help="student's labelled budget")
    for p in (importer, layout_parser):
        p.add_argument("--sample-rate", type=int, default=16000, help="wav: resample to")
        p.add_argument("--features", choices=["mfcc", "logmel"], default="mfcc", help="wav")
        p.add_argument("--n-mels", type=int, default=40, help="wav: mel filters")
        p.add_argument("--n-mfcc", type=int, default=13, help="wav: MFCC coefficients")
        p.add_argument("--win-ms", type=float, default=25.0, help="wav: window length")
        p.add_argument("--hop-ms", type=float, default=10.0, help="wav: hop between windows")
        p.add_argument("--preemphasis", type=float, default=0.0, help="wav: e.g. 0.97")
        p.add_argument("--trim-db", type=float, help="wav: drop silence this far below the peak")
        p.add_argument(
            "--normalise", choices=["none", "mean", "meanvar"], default="none", help="wav: per clip"
        )
        p.add_argument("--height", type=int, default=28, help="images: resize to")
        p.add_argument("--width", type=int, default=28, help="images: resize to")
    bank = sub.add_parser("bank", help="look at a teacher bank")
    bank.add_argument("action", choices=["inspect"])
    bank.add_argument("path", nargs="?", help="default: data/teacher/bank.safetensors")
    bank.add_argument("--json", action="store_true", help="print JSON")
    predict = sub.add_parser("predict", help="classify .npy inputs with an exported student")
    predict.add_argument("model", help="the student's .onnx file")
    predict.add_argument("input", help="a .npy file (one sample or a batch) or a folder of them")
    predict.add_argument("--json", action="store_true", help="print JSON")
    serve = sub.add_parser("serve", help="serve an exported student over HTTP")
    serve.add_argument("model", help="the student's .onnx file")
    serve.add_argument("--host", default="127.0.0.1", help="address (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--max-batch", type=int, default=64, help="samples per request")
    serve.add_argument("--max-length", type=int, default=4096, help="frames per sequence")
    serve.add_argument("--max-body-bytes", type=int, default=8 << 20, help="request body size")
    serve.add_argument("--threads", type=int, default=0, help="onnxruntime threads (0: auto)")
    seeds = sub.add_parser("seeds", help="several seeds of the distill stage on a Dask cluster")
    seeds.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    seeds.add_argument("--methods", nargs="+", default=[], help="default: distill.method and ce")
    seeds.add_argument("--workers", type=int, default=2, help="local cluster: processes")
    seeds.add_argument("--address", help="an existing Dask scheduler, e.g. tcp://host:8786")
    server = sub.add_parser("server", help="a local Prefect server and dashboard (foreground)")
    server.add_argument(
        "--stop",
        action="store_true",
        help="stop instead the background server that cmkd run and cmkd stage share",
    )
    deployer = sub.add_parser("deploy", help="the work pool and the nightly deployment")
    deployer.add_argument(
        "--serve", action="store_true", help="serve the deployment in this process instead"
    )
    worker = sub.add_parser("worker", help="a process worker for the deployment (foreground)")
    for p in (server, deployer, worker):
        p.add_argument("--port", type=int, default=4200, help="the server's port on 127.0.0.1")
    for p in (predict, serve):
        p.add_argument("--card", help="model card (default: model_card.json beside the model)")
    roots = (run, stage, show, bench, importer, layout_parser, bank, seeds, server, deployer)
    for p in (*roots, worker):
        p.add_argument("--root", default=".", help="project root (default: .)")
    for p in (run, stage):
        p.add_argument(
            "-v",
            "--verbose",
            action="store_true",
            help="show Prefect's and DVC's logs live, and a failure's traceback",
        )
    args = parser.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    from flows.project import refuse_outside_project

    refused = refuse_outside_project(args)  # before any server, import or file
    if refused is not None:
        return refused
    if args.command in ("predict", "serve"):
        return _deploy(args)  # onnxruntime only: no torch, Prefect or DVC imported
    if args.command == "stage":  # under `cmkd run`, the pipeline's process runs the stage
        from tasks.stage_host import delegate

        try:
            code = delegate(args.name, args.root)
        except KeyboardInterrupt:  # Ctrl-C reached the pipeline too: it says so
            return 130
        if code is None:  # a bare `dvc repro`: the project's stage worker, if there is one
            from tasks import stage_worker

            code = stage_worker.delegate(args.name, args.root, args.argv)
        if code is not None:
            return code
    if args.command in ("run", "stage"):  # the local server, if needed, starts meanwhile
        from flows.local_server import start_early

        start_early()
    if args.command == "server" and args.stop:
        from flows.local_server import stop_server

        pid = stop_server()
        print(f"cmkd: stopped the local Prefect server (pid {pid})" if pid else "cmkd: none runs")
        return 0
    if args.command in ("server", "deploy", "worker"):
        from flows.deploy import command

        return command(args.command, Path(args.root), args.port, getattr(args, "serve", False))

    from tasks.layout import Layout

    layout = Layout(Path(args.root))
    try:
        if args.command == "stage":
            from flows.console import quiet_tracebacks
            from flows.stages import run_stage

            if not args.verbose:
                quiet_tracebacks()
            root = Path(args.root)
            return _run_flow(run_stage, name=args.name, root=root, traceback=args.verbose)
        if args.command == "bank":
            from cmkd_core.align.similarity import describe_bank
            from cmkd_core.bank import load_bank

            bank = load_bank(args.path or layout.bank)
            facts = describe_bank(bank)
            facts["class_similarity"] = _student_geometry(layout, bank)
            print(json.dumps(facts, indent=1) if args.json else bank_text(facts))
            return 0
        if args.command == "import":
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
                out = import_images(
                    args.source, args.labels, args.out, front_end=front_end, **common
                )
            else:
                out = import_arrays(
                    args.source, args.labels, args.out, modality=args.modality, **common
                )
            samples = len((out / "manifest.csv").read_text().splitlines()) - 1
            print(f"cmkd: wrote {out} ({samples} samples)")
            return 0
        if args.command == "import-layout":
            from cmkd_core.data.layouts import import_layout
            from cmkd_core.frontend import ImageFrontEnd

            written = import_layout(
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
        if args.command == "seeds":
            from flows.seeds import run_on_dask

            result = run_on_dask(args.root, args.seeds, args.methods, args.workers, args.address)
            for method, row in result["summary"].items():
                print(
                    f"{method:>14}  test accuracy {100 * row['mean']:.2f} +- "
                    f"{100 * row['std']:.2f} over seeds {row['seeds']}"
                )
            return 0
        if args.command == "bench":
            from flows.bench import run_benchmark

            return run_benchmark(args, layout)
        if args.command == "run":
            from flows.console import run_console
            from flows.pipeline import pipeline
            from tasks.dvc import StageFailedError

            log = run_console(layout.logs, args.verbose)
            print(f"cmkd run: stage, outcome, seconds (full log: {log})", flush=True)
            try:
                result = _run_flow(pipeline, meanwhile=STAGE_MODULES, root=args.root)
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
        metrics = json.loads(layout.metrics.read_text())
        print(summary_text(metrics, str(layout.onnx)))
        return 0
    except Exception as exc:
        if _bad_input(exc):
            return _failed(str(exc), 2)
        if getattr(args, "verbose", False):
            import traceback

            traceback.print_exc()
        return _failed(f"{type(exc).__name__}: {exc}", 1)


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


def _bad_input(exc: Exception) -> bool:
    """Whether ``exc`` says the input (data, params, a bank) is bad: exit status 2. The classes
    are imported here, not at the top, so that commands which never load torch start fast."""
    from cmkd_core.bank import BankError
    from cmkd_core.config import ParamsError
    from cmkd_core.data import DataContractError

    return isinstance(exc, (DataContractError, ParamsError, BankError))


def _failed(message: str, code: int) -> int:
    """Print the error once and return ``code``."""
    print(f"cmkd: {message}", file=sys.stderr)
    return code


def entry() -> None:
    """The ``cmkd`` console script: :func:`main`, then an exit that skips the interpreter's
    teardown of torch and Prefect (about 2 s; tasks/process.py)."""
    try:
        code = main()
    except SystemExit as exc:  # argparse's --help and usage errors
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if not isinstance(exc.code, int | None):
            print(exc.code, file=sys.stderr)
    except KeyboardInterrupt:
        if "-v" in sys.argv or "--verbose" in sys.argv:
            import traceback

            traceback.print_exc()
        print("cmkd: interrupted", file=sys.stderr)
        code = 130
    from tasks.process import exit_now

    exit_now(code)


if __name__ == "__main__":
    entry()
