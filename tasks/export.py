"""Task of the ``export`` stage: ONNX file, parity gate on the test split, model card."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os

import numpy as np
import onnx
from prefect import get_run_logger, task
from prefect.cache_policies import NONE
from prefect.runtime import flow_run

from cmkd_core.config import Params
from cmkd_core.data import check_dataset, sha256_file
from cmkd_core.data.contract import ModalityDataset
from cmkd_core.data.tensors import Samples, samples_of
from cmkd_core.deploy import novelty
from cmkd_core.export import (
    INT8_OPS,
    ParityError,
    check_parity,
    export_onnx,
    input_names,
    onnx_accuracy,
    quantize_int8,
)
from cmkd_core.models.checkpoint import load_classifier
from tasks.data import write_json
from tasks.layout import Layout
from tasks.timing import computing


def _sha256_json(payload: object) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _int8(layout: Layout, params: Params, source, test, float_accuracy: float) -> dict:
    """Quantise ``source`` to int8 and keep it only if it loses at most ``int8_max_drop``
    points of test accuracy; the card records the verdict either way."""
    staging = layout.onnx_int8.with_name(".staging-" + layout.onnx_int8.name)
    try:
        quantize_int8(source, staging)
        with computing("parity"):
            accuracy = onnx_accuracy(staging, test)
        drop = round(100 * (float_accuracy - accuracy), 9)  # 3 of 600 is 0.5, not 0.5000001
        verdict = {
            "quantized_ops": list(INT8_OPS),
            "test_accuracy": accuracy,
            "float32_test_accuracy": float_accuracy,
            "drop_points": drop,
            "max_drop_points": params.export.int8_max_drop,
        }
        if drop > params.export.int8_max_drop:
            layout.onnx_int8.unlink(missing_ok=True)  # an older int8 file must not outlive this
            get_run_logger().warning(
                "int8 model refused: test accuracy %.4f vs float32 %.4f (-%.2f points > %.2f)",
                accuracy,
                float_accuracy,
                drop,
                params.export.int8_max_drop,
            )
            return {**verdict, "written": False, "reason": "loses more than int8_max_drop"}
        staging.replace(layout.onnx_int8)
        return {
            **verdict,
            "written": True,
            "file": layout.onnx_int8.name,
            "sha256": sha256_file(layout.onnx_int8),
        }
    finally:
        staging.unlink(missing_ok=True)


def _input_check(dataset: ModalityDataset) -> dict:
    """What ``cmkd predict`` and ``cmkd serve`` compare each input with (cmkd_core/deploy/
    novelty.py), fitted on the train split, its threshold from train and validation."""
    sequence = dataset.meta.kind == "sequence"

    def summaries(split: str) -> np.ndarray:
        samples = dataset.each_sample(dataset.rows(split))
        return np.stack([novelty.summary(sample, sequence) for sample in samples])

    return novelty.fit(summaries("train"), summaries("val"), summaries("test"))


UNSEEN = ("test_accuracy_labelled_classes", "test_accuracy_unlabelled_classes", "test_h")
"""The metrics of a student trained with classes that had no label (tasks/evaluate.py)."""


def _inputs(test: Samples, meta) -> dict[str, str]:
    """The card's description of each ONNX input: its dtype and shape, and what it holds."""
    frames = (
        f"float32 (batch, time, {meta.sample_shape[0]}): raw frames, zero-padded past each length"
        if meta.kind == "sequence"
        else f"float32 (batch, {', '.join(map(str, meta.sample_shape))})"
    )
    lengths = "int64 (batch,): number of valid frames per sample"
    return dict(zip(input_names(test), [frames, lengths], strict=False))


@task(name="export-student", cache_policy=NONE)
def export_student(layout: Layout, params: Params) -> dict:
    """Export the distilled student; fail unless onnxruntime matches torch on the test split
    and reproduces the test accuracy in ``metrics.json``."""
    method = params.distill.method
    model, spec, info = load_classifier(layout.student_weights(method))
    classes = info["classes"]
    dataset = check_dataset(layout.student_data, classes=classes)
    test = samples_of(dataset, dataset.rows("test"), classes)
    metrics = json.loads(layout.metrics.read_text())
    # Export and check under a temporary name: a failed gate leaves the previous file alone.
    staging = layout.onnx.with_name(".staging-" + layout.onnx.name)
    try:
        export_onnx(model, test, staging, opset=params.export.opset)
        with computing("parity"):
            parity = check_parity(model, staging, test, atol=params.export.atol)
        expected = metrics["student"]["test_accuracy"]
        if abs(parity.onnx_accuracy - expected) > 1e-12:
            raise ParityError(
                f"{staging}: onnxruntime test accuracy {parity.onnx_accuracy:.6f} != "
                f"{expected:.6f} in {layout.metrics}"
            )
        int8 = (
            _int8(layout, params, staging, test, parity.onnx_accuracy) if params.export.int8 else {}
        )
        staging.replace(layout.onnx)
    finally:
        staging.unlink(missing_ok=True)
    report = json.loads(layout.validation_report.read_text())
    norm = model.encoder.norm
    card = {
        "model": "cmkd student",
        "file": layout.onnx.name,
        "sha256": sha256_file(layout.onnx),
        "method": method,
        **{k: metrics[k] for k in ("chosen", "candidates_val_accuracy") if k in metrics},
        "paper": "arXiv:2606.10504 (ICML 2026)",
        "classes": classes,
        **{k: metrics[k] for k in ("unlabelled_classes",) if k in metrics},
        "modality": dataset.meta.modality,
        "dataset": dataset.meta.name,
        "architecture": spec,
        "opset": onnx.load(str(layout.onnx), load_external_data=False).opset_import[0].version,
        "inputs": _inputs(test, dataset.meta),
        "outputs": {"logits": f"float32 (batch, {len(classes)}); softmax for probabilities"},
        "front_end": dataset.meta.extra.get("front_end"),
        **{k: v for k, v in dataset.meta.extra.items() if k == "speakers"},
        "input_check": _input_check(dataset),
        "normalisation": {
            "inside_graph": True,
            "formula": "(x - mean) / std per feature, train-split statistics",
            "mean": norm.mean.tolist(),
            "std": norm.std.tolist(),
        },
        "metrics": {
            "test_accuracy": metrics["student"]["test_accuracy"],
            "test_macro_f1": metrics["student"]["test_macro_f1"],
            "val_accuracy": metrics["student"]["val_accuracy"],
            "ce_only_test_accuracy": metrics["ce_only"]["test_accuracy"],
            "onnx_test_accuracy": parity.onnx_accuracy,
            "onnx_max_abs_logit_diff": parity.max_abs_diff,
            **{k: v for k, v in metrics["student"].items() if k.startswith(UNSEEN)},
        },
        "int8": int8,
        "teacher": info.get("teacher", {}),
        "params_sha256": _sha256_json(params.model_dump(mode="json")),
        "data_sha256": _sha256_json({k: report[k]["sha256"] for k in ("teacher", "student")}),
        "run": {  # the pipeline run that exported it (flows/pipeline.py sets CMKD_RUN_*)
            "pipeline_flow_run": os.environ.get("CMKD_RUN_NAME"),
            "pipeline_flow_run_id": os.environ.get("CMKD_RUN_ID"),
            "export_flow_run": flow_run.name,
            "exported_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        },
    }
    write_json(layout.model_card, card)
    get_run_logger().info("exported %s (max |diff| %.2g)", layout.onnx, parity.max_abs_diff)
    return card
