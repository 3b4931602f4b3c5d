"""The data contract, its validation, the embedded default datasets and the samplers."""

from cmkd_core.data.contract import (
    DataContractError,
    DatasetMeta,
    ModalityDataset,
    Problem,
    atomic_path,
    leftover_temporaries,
    read_dataset,
    sha256_file,
    write_dataset,
    write_text_atomic,
)
from cmkd_core.data.validate import check_dataset, check_pair

_LAZY = {"ClassMatchedSampler", "epoch_batches"}  # need torch: imported when first asked for


def __getattr__(name: str):
    if name in _LAZY:
        from cmkd_core.data import samplers

        return getattr(samplers, name)
    raise AttributeError(f"module 'cmkd_core.data' has no attribute {name!r}")


__all__ = [
    "ClassMatchedSampler",
    "DataContractError",
    "DatasetMeta",
    "ModalityDataset",
    "Problem",
    "atomic_path",
    "check_dataset",
    "check_pair",
    "epoch_batches",
    "leftover_temporaries",
    "read_dataset",
    "sha256_file",
    "write_dataset",
    "write_text_atomic",
]
