"""Injected I/O faults: a full disk while writing, a permission refused on an input, an output
of one stage vanishing before the next. Each fails its stage with a message naming the file,
leaves the previous outputs as they were and no partial file behind."""

from __future__ import annotations

import errno
import shutil

import numpy as np
import pytest
from conftest import make_trained_project
from prefect.exceptions import MissingResult

from cmkd_core.bank import BankError
from cmkd_core.data import DataContractError


@pytest.fixture(scope="module")
def project(tmp_path_factory, pair_root, tiny_params, prefect_harness):
    params = tiny_params.model_dump(mode="json")
    params["distill"]["epochs"] = 2
    return make_trained_project(tmp_path_factory.mktemp("faults"), pair_root, params)


def _files(root):
    """Path -> bytes of every file under ``root``'s data folder."""
    return {p: p.read_bytes() for p in (root / "data").rglob("*") if p.is_file()}


def test_disk_full_while_writing_the_bank_fails_the_teacher_stage_cleanly(project, monkeypatch):
    import cmkd_core.tensorfile as tensorfile
    from flows.stages import teacher

    before = _files(project)

    def full_disk(filename, data):
        if not str(filename).startswith(str(project / "data" / "teacher" / ".bank")):
            return real(filename, data)
        with open(filename, "wb") as handle:  # half a file, then the disk is full
            handle.write(data[:1000])
        raise OSError(errno.ENOSPC, "No space left on device")

    real = tensorfile._write
    monkeypatch.setattr(tensorfile, "_write", full_disk)
    with pytest.raises(OSError, match=r"writing .*bank\.safetensors: No space left on device"):
        teacher(root=str(project))
    after = _files(project)
    # the teacher's weights and metrics come before the bank: written whole or not at all
    changed = {p for p in after if after[p] != before.get(p)}
    assert (project / "data" / "teacher" / "bank.safetensors") not in changed
    assert (
        after[project / "data" / "teacher" / "bank.safetensors"]
        == before[project / "data" / "teacher" / "bank.safetensors"]
    )
    assert not [p for p in project.rglob("*.tmp")]


def test_permission_denied_on_an_input_fails_validate_naming_the_file(project, monkeypatch):
    import cmkd_core.data.contract as contract
    from flows.stages import validate

    report = project / "data" / "validated" / "report.json"
    before = report.read_bytes()
    real_load = np.load

    def refuse(path, *args, **kwargs):
        if str(path).endswith("frames.npy"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(contract.np, "load", refuse)
    with pytest.raises(DataContractError, match=r"frames\.npy.*Permission denied"):
        validate(root=str(project))
    assert report.read_bytes() == before


def test_an_output_vanishing_between_stages_stops_the_next_one(project, tmp_path):
    from flows.stages import distill

    bank = project / "data" / "teacher" / "bank.safetensors"
    kept = tmp_path / "bank.safetensors"
    shutil.move(bank, kept)
    try:
        with pytest.raises((BankError, MissingResult), match=r"bank\.safetensors"):
            distill(root=str(project))
        assert not (project / "data" / "distill").exists()  # nothing ran on a missing input
    finally:
        shutil.move(kept, bank)
