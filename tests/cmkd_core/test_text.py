"""The text teacher: texts per class embedded into a teacher dataset, a head fitted on them,
the CSV refused when it names a class the student lacks or misses one; the encoder found as a
folder or an installed module, or a clear error; the class-similarity diagnostic."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from text_stand_in import HashingEncoder

from cmkd_core.align.similarity import class_similarity, similarity_correlation
from cmkd_core.data import DataContractError, check_dataset
from cmkd_core.teachers import bank_from_vectors
from cmkd_core.text import TextModelError, import_texts, load_text_encoder

WORDS = {"bag": "handbag purse strap", "coat": "warm winter jacket", "hat": "cap brim head"}


def _texts(path, classes=WORDS, per_class=6):
    rows = [
        (label, f"a {words.split()[i % 3]} photo number {i}")
        for label, words in classes.items()
        for i in range(per_class)
    ]
    pd.DataFrame(rows, columns=["label", "text"]).to_csv(path, index=False)
    return path


def test_texts_become_a_teacher_dataset_and_a_bank_with_a_fitted_head(tmp_path):
    csv = _texts(tmp_path / "texts.csv")
    out = import_texts(csv, tmp_path / "teacher", HashingEncoder(), name="t", model="stand-in")
    dataset = check_dataset(out)
    assert dataset.meta.modality == "text" and dataset.meta.sample_shape == (32,)
    assert dataset.meta.classes == ("bag", "coat", "hat")
    assert dataset.meta.extra["text_model"] == "stand-in"
    rows = dataset.fixed_arrays(dataset.manifest)
    texts = pd.read_csv(csv)["text"].tolist()
    assert np.allclose(rows, HashingEncoder().encode(texts))  # the embeddings, as they are
    bank, accuracy = bank_from_vectors(dataset)
    assert torch.equal(bank.features, torch.from_numpy(rows))
    assert bank.head_weight.shape == (3, 32) and bank.info["source"] == "text"
    assert bank.info["head_l2"] in (1e-4, 1e-3, 1e-2, 1e-1)
    train = bank.split("train")
    predicted = bank.head()(bank.features[train]).argmax(1)
    assert (predicted == bank.labels[train]).float().mean() == 1.0  # separable: words differ
    assert 0 <= accuracy["val"] <= 1 and 0 <= accuracy["test"] <= 1


def test_a_text_for_a_class_the_student_lacks_or_a_class_without_text_is_refused(tmp_path):
    csv = _texts(tmp_path / "texts.csv")
    with pytest.raises(DataContractError) as caught:
        import_texts(
            csv, tmp_path / "t1", HashingEncoder(), name="t", model="m", classes=("bag", "coat")
        )
    text = str(caught.value)
    assert "texts.csv" in text and "column=label" in text and "'hat' is not a student class" in text
    assert "row=12" in text  # the first 'hat' row
    with pytest.raises(DataContractError, match="no text for class 'shoe'"):
        import_texts(
            csv,
            tmp_path / "t2",
            HashingEncoder(),
            name="t",
            model="m",
            classes=("bag", "coat", "hat", "shoe"),
        )
    assert not (tmp_path / "t1").exists() and not (tmp_path / "t2").exists()


def test_the_encoder_is_a_folder_or_an_installed_module_or_a_clear_error(tmp_path):
    assert isinstance(load_text_encoder("text_stand_in"), HashingEncoder)
    with pytest.raises(TextModelError, match=r"pip install -e '\.\[text\]'"):
        load_text_encoder("no_such_text_model_here", tmp_path)
    with pytest.raises(TextModelError, match="neither get_model_path"):
        load_text_encoder("json", tmp_path)


def test_class_similarity_is_the_cosine_of_class_means():
    features = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    labels = torch.tensor([0, 0, 1, 2])
    s = class_similarity(features, labels, 3)
    assert s[0, 1] == pytest.approx(0.0) and s[0, 2] == pytest.approx(2**-0.5)
    assert np.allclose(np.diag(s), 1.0) and np.allclose(s, s.T)


def test_the_similarity_correlation_and_its_permutation_p_value():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(8, 8))
    a = a + a.T
    same = similarity_correlation(a, a, permutations=2000)
    assert same["correlation"] == pytest.approx(1.0) and same["p_value"] < 0.01
    opposite = similarity_correlation(a, -a, permutations=2000)
    assert opposite["correlation"] == pytest.approx(-1.0) and opposite["p_value"] > 0.99
    with pytest.raises(ValueError, match="C >= 3"):
        similarity_correlation(a[:2, :2], a[:2, :2])
