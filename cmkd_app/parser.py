"""The ``cmkd`` command line's arguments (cmkd_app/cli.py runs them)."""

from __future__ import annotations

import argparse

from flows.registry import NAMES


def _pipeline_commands(sub) -> dict[str, argparse.ArgumentParser]:
    """``run``, ``stage``, ``summary``, ``bench``, ``bank`` and ``seeds``."""
    run = sub.add_parser("run", help="run the whole pipeline through DVC")
    run.add_argument(
        "--push",
        action="store_true",
        help="push to the default DVC remote even when it is on the same disk as the cache",
    )
    push = sub.add_parser("push", help="push the cached artifacts to the default DVC remote")
    stage = sub.add_parser("stage", help="run one stage's flow (as dvc.yaml does)")
    stage.add_argument("name", choices=NAMES)
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
        "--unlabelled-classes",
        type=int,
        default=0,
        metavar="N",
        help="leave N classes of each student without any label (drawn per seed)",
    )
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
    bank = sub.add_parser("bank", help="look at a teacher bank")
    bank.add_argument("action", choices=["inspect"])
    bank.add_argument("path", nargs="?", help="default: data/teacher/bank.safetensors")
    bank.add_argument("--json", action="store_true", help="print JSON")
    seeds = sub.add_parser("seeds", help="several seeds of the distill stage on a Dask cluster")
    seeds.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    seeds.add_argument("--methods", nargs="+", default=[], help="default: distill.method and ce")
    seeds.add_argument("--workers", type=int, default=2, help="local cluster: processes")
    seeds.add_argument("--address", help="an existing Dask scheduler, e.g. tcp://host:8786")
    return {
        "run": run,
        "push": push,
        "stage": stage,
        "summary": show,
        "bench": bench,
        "bank": bank,
        "seeds": seeds,
    }


def _import_commands(sub) -> dict[str, argparse.ArgumentParser]:
    """``import`` and ``import-layout``: contract datasets from your files."""
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
    return {"import": importer, "import-layout": layout_parser}


def _deployed_commands(sub) -> dict[str, argparse.ArgumentParser]:
    """``predict`` and ``serve``: an exported student, by onnxruntime."""
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
    for p in (predict, serve):
        p.add_argument("--card", help="model card (default: model_card.json beside the model)")
    return {"predict": predict, "serve": serve}


def _server_commands(sub) -> dict[str, argparse.ArgumentParser]:
    """``server``, ``deploy`` and ``worker``: Prefect's server and the nightly deployment."""
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
    return {"server": server, "deploy": deployer, "worker": worker}


def build_parser(description: str) -> argparse.ArgumentParser:
    """Every ``cmkd`` command and its options."""
    parser = argparse.ArgumentParser(
        prog="cmkd", description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    commands = {
        **_pipeline_commands(sub),
        **_import_commands(sub),
        **_deployed_commands(sub),
        **_server_commands(sub),
    }
    for name, p in commands.items():
        if name not in ("predict", "serve"):
            p.add_argument("--root", default=".", help="project root (default: .)")
    for p in (commands["run"], commands["stage"]):
        p.add_argument(
            "-v",
            "--verbose",
            action="store_true",
            help="show Prefect's and DVC's logs live, and a failure's traceback",
        )
    return parser
