"""The data contract, its validation, the embedded default datasets and the samplers."""

from cmkd_core.data.contract import (
    DataContractError,
    DatasetMeta,
    ModalityDataset,
    Problem,
    atomic_path,
    read_dataset,
    write_dataset,
    write_text_atomic,
)
from cmkd_core.data.samplers import ClassMatchedSampler, epoch_batches
from cmkd_core.data.validate import check_dataset, check_pair

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
    "read_dataset",
    "write_dataset",
    "write_text_atomic",
]
