"""Class-matched sampling, batching, the masked sequence encoder and the model registry."""

from __future__ import annotations

import pytest
import torch

from cmkd_core.data.samplers import ClassMatchedSampler, epoch_batches
from cmkd_core.models import Classifier, create_model, list_models


def test_class_matched_draw_gives_the_same_label_multiset():
    gen = torch.Generator().manual_seed(0)
    bank_labels = torch.randint(0, 5, (200,), generator=gen)
    sampler = ClassMatchedSampler(bank_labels, 5)
    for _ in range(20):
        labels = torch.randint(0, 5, (64,), generator=gen)
        rows = sampler.draw(labels, gen)
        assert torch.equal(bank_labels[rows], labels)
        assert torch.equal(
            torch.bincount(bank_labels[rows], minlength=5), torch.bincount(labels, minlength=5)
        )


def test_class_matched_draw_spreads_over_the_class_pool():
    bank_labels = torch.tensor([0] * 50 + [1] * 50)
    sampler = ClassMatchedSampler(bank_labels, 2)
    rows = sampler.draw(torch.zeros(1000, dtype=torch.long), torch.Generator().manual_seed(1))
    assert len(set(rows.tolist())) > 40


def test_sampler_refuses_a_class_missing_from_the_bank():
    with pytest.raises(ValueError, match=r"no row of class index \[2\]"):
        ClassMatchedSampler(torch.tensor([0, 1, 0, 1]), 3)


def test_epoch_batches_cover_every_index_once():
    batches = list(epoch_batches(101, 10, torch.Generator().manual_seed(0)))
    assert sorted(torch.cat(batches).tolist()) == list(range(101))
    assert min(len(b) for b in batches) >= 2  # a lone last sample is merged


def test_sequence_encoder_output_does_not_depend_on_padding():
    torch.manual_seed(0)
    model = Classifier(create_model("sequence_cnn", sample_shape=(13,), feature_dim=16), 4).eval()
    x = torch.randn(1, 9, 13)
    alone = model(x, torch.tensor([9]))
    padded = torch.cat([x, torch.randn(1, 30, 13) * 100], dim=1)  # garbage past the length
    batch = torch.cat([padded, torch.randn(1, 39, 13)])
    together = model(batch, torch.tensor([9, 39]))
    assert torch.allclose(alone, together[:1], atol=1e-5)


def test_unknown_model_lists_the_valid_ones():
    with pytest.raises(KeyError, match="image_cnn, mlp, sequence_cnn"):
        create_model("transformer_xl")
    assert {"image_cnn", "sequence_cnn"} <= set(list_models())
