"""The default pair and its teacher bank, as the distill benchmarks (``bench/distill.py`` and
``bench/distill_sections.py``) use them; core only, no flow."""

from __future__ import annotations

from pathlib import Path

from cmkd_core.bank import FileBankCache, TeacherBank
from cmkd_core.benchmark.plan import build_bank, load_pair, teacher_key
from cmkd_core.config import DistillParams, load_params
from cmkd_core.data.contract import ModalityDataset

ROOT = Path(__file__).resolve().parents[1]


def setup(device: str) -> tuple[DistillParams, ModalityDataset, ModalityDataset, TeacherBank]:
    """The default params (distill on ``device``), the digits->fsdd pair and the teacher's bank
    (from the benchmark's cache, or trained once and cached)."""
    params = load_params(ROOT / "params.yaml")
    distill = params.distill.model_copy(update={"device": device})
    data = params.data.model_copy(update={"recordings": str(ROOT / params.data.recordings)})
    teacher_ds, student = load_pair("digits->fsdd", data)
    teacher = params.teacher.model_copy(update={"device": "cpu"})
    cache, key = FileBankCache(ROOT / ".cmkd" / "bench" / "banks"), teacher_key(teacher_ds, teacher)
    hit = cache.get(key, "digits")
    bank = hit[0] if hit is not None else build_bank(teacher_ds, teacher)[0]
    if hit is None:
        cache.put(key, "digits", bank)
    return distill, teacher_ds, student, bank
