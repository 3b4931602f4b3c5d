"""The semi-supervised pieces: views, the balanced assignment, fixmatch, sinkhorn_ssl, the
paired methods on unlabelled pairs, the step budget and auto's choice."""

from __future__ import annotations

import functools

import pytest
import torch

from cmkd_core.align import balanced_assignment
from cmkd_core.bank import TeacherBank
from cmkd_core.benchmark.plan import random_prototype_bank
from cmkd_core.config import DistillParams
from cmkd_core.data.augment import input_kind, make_view, views_for
from cmkd_core.data.tensors import Samples
from cmkd_core.distill import TrainSettings, train_classifier
from cmkd_core.distill.auto import VARIANTS, candidates, choose
from cmkd_core.distill.batches import BatchSource, round_batches, steps_per_round
from cmkd_core.distill.methods import Batch, MethodError, create_method
from cmkd_core.distill.methods.sinkhorn_ssl import class_prototypes
from cmkd_core.models import Classifier, create_model
from cmkd_core.recipes import resolve

C, D_T = 4, 12
LATE = DistillParams().ssl.start + DistillParams().ssl.ramp  # a step with the full weight


def _bank(n: int = 80) -> TeacherBank:
    gen = torch.Generator().manual_seed(0)
    labels = torch.cat([torch.full((k + 5,), k) for k in range(C)])  # unequal proportions
    labels = labels[torch.arange(n) % len(labels)]
    return TeacherBank(
        features=torch.randn(n, D_T, generator=gen).abs() + torch.eye(C, D_T)[labels] * 3,
        labels=labels,
        splits=torch.zeros(n, dtype=torch.long),
        head_weight=torch.randn(C, D_T, generator=gen),
        head_bias=torch.zeros(C),
        classes=tuple("abcd"),
        ids=tuple(f"t{i}" for i in range(n)),
    )


def _student() -> Classifier:
    torch.manual_seed(0)
    return Classifier(create_model("sequence_cnn", sample_shape=(5,), feature_dim=8), C, D_T)


def _sequences(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 20, 5, generator=gen), torch.randint(6, 21, (n,), generator=gen)


def _batch(step: int = LATE, unlabelled: bool = True) -> Batch:
    views = views_for("sequence", torch.zeros(5), torch.ones(5))
    gen = torch.Generator().manual_seed(3)
    batch = Batch(_sequences(8, 1), torch.arange(8) % C, step=step)
    if unlabelled:
        plain = _sequences(12, 2)
        batch.unlabelled = views.weak(plain, gen)
        batch.unlabelled_strong = views.strong(plain, gen)
    return batch


def test_sequence_views_crop_within_each_clip_and_are_seeded():
    x, lengths = _sequences(32, 0)
    for level, low in (("weak", 0.9), ("strong", 0.7)):
        view = make_view("sequence", level, torch.zeros(5), torch.ones(5))
        a = view((x, lengths), torch.Generator().manual_seed(5))
        b = view((x, lengths), torch.Generator().manual_seed(5))
        c = view((x, lengths), torch.Generator().manual_seed(6))
        assert torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])
        new = a[1]
        assert (new <= lengths).all() and (new >= torch.floor(low * lengths) - 1).all()
        assert a[0].shape == (32, int(new.max()), 5)


def test_image_and_vector_views_keep_shapes_and_change_values():
    images = torch.rand(6, 8, 8)
    for kind, x in (("image", images), ("vector", torch.rand(6, 10))):
        assert input_kind((x,)) == kind
        for level in ("weak", "strong"):
            out = make_view(kind, level, torch.zeros(1), torch.ones(1))(
                (x,), torch.Generator().manual_seed(0)
            )
            assert out[0].shape == x.shape and not torch.equal(out[0], x)
    with pytest.raises(ValueError, match="unknown view 'medium'; valid: weak, strong"):
        make_view("image", "medium", torch.zeros(1), torch.ones(1))


def test_balanced_assignment_marginals_are_the_bank_class_proportions():
    bank = _bank()
    prototypes, proportions = class_prototypes(bank)
    assert torch.allclose(proportions, torch.bincount(bank.labels).float() / len(bank.labels))
    assert torch.allclose(prototypes.norm(dim=1), torch.ones(C))
    cost = 1 - torch.nn.functional.normalize(torch.randn(50, D_T), dim=1) @ prototypes.T
    targets, plan = balanced_assignment(cost, proportions, eps=0.05, iterations=200)
    assert torch.allclose(targets.sum(1), torch.ones(50), atol=1e-5)
    assert torch.allclose(plan.sum(0), proportions, atol=1e-4)  # columns: class proportions
    assert torch.allclose(plan.sum(1), torch.full((50,), 1 / 50), atol=1e-4)
    with pytest.raises(ValueError, match=r"class_weights must have shape \(4,\)"):
        balanced_assignment(cost, torch.ones(3) / 3)


@pytest.mark.parametrize("name", ["fixmatch", "sinkhorn_ssl"])
def test_ssl_methods_train_on_the_unlabelled_views_after_their_start(name):
    bank = _bank()
    params = DistillParams(ssl={"threshold": 0.01})  # fixmatch keeps every pseudo-label
    method = create_method(name, params, bank)
    unlabelled_term = "pseudo" if name == "fixmatch" else "sinkhorn"
    early = method(_student(), _batch(step=0))
    assert unlabelled_term not in early  # off for the first ssl.start steps
    model = _student()
    terms = method(model, _batch())
    assert torch.isfinite(terms["loss"]) and unlabelled_term in terms
    terms["loss"].backward()
    grads = [p.grad for p in model.encoder.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    # The unlabelled term alone moves the encoder: gradients differ from the labelled-only step.
    alone = _student()
    method(alone, _batch(unlabelled=False))["loss"].backward()
    assert any(
        not torch.allclose(p.grad, q.grad)
        for p, q in zip(model.encoder.parameters(), alone.encoder.parameters(), strict=True)
    )


def test_sinkhorn_ssl_without_unlabelled_data_keeps_its_labelled_terms():
    terms = create_method("sinkhorn_ssl", DistillParams(), _bank())(
        _student(), _batch(unlabelled=False)
    )
    assert set(terms) == {"ce", "proto_ce", "loss"}
    assert float(terms["loss"]) == pytest.approx(float(terms["ce"] + terms["proto_ce"]))


def test_random_prototype_control_keeps_proportions_and_drops_geometry():
    bank = _bank()
    control = random_prototype_bank(bank)
    means, props = class_prototypes(control)
    assert torch.equal(props, class_prototypes(bank)[1])
    assert not torch.allclose(means, class_prototypes(bank)[0], atol=0.1)
    assert control.features.unique(dim=0).shape[0] == C  # one vector per class


@pytest.mark.parametrize("name", ["hinton_kd", "fitnet"])
def test_paired_methods_take_their_teacher_term_over_unlabelled_pairs(name):
    bank = _bank()
    method = create_method(name, DistillParams(), bank)
    batch = _batch(unlabelled=False)
    batch.teacher_features = bank.features[:8]
    term = "kd" if name == "hinton_kd" else "hint"
    labelled_only = float(method(_student(), batch)[term])
    batch.unlabelled = _sequences(12, 2)
    batch.unlabelled_teacher = bank.features[20:32]
    assert float(method(_student(), batch)[term]) != pytest.approx(labelled_only)
    # Through the loop: unlabelled samples with pairs reach every batch of a paired run.
    x, lengths = _sequences(16, 4)
    train = Samples.from_padded(x, lengths, torch.arange(16) % C, pair_index=torch.arange(16))
    unlabelled = Samples.from_padded(*_sequences(10, 5), torch.zeros(10, dtype=torch.long))
    seen = []
    real = method.extra

    def spy(model, batch, features, logits):
        seen.append(None if batch.unlabelled_teacher is None else len(batch.unlabelled_teacher))
        return real(model, batch, features, logits)

    method.extra = spy
    settings = TrainSettings(1, 8, 1e-3, 0.0, 0, 0, progress=False)
    source = functools.partial(BatchSource, train, method, settings, bank=bank, pairing="paired")
    with pytest.raises(MethodError, match="unlabelled samples have no pairs"):
        source(unlabelled=unlabelled)
    unlabelled.pair_index = torch.arange(40, 50)
    train_classifier(_student(), method, source(unlabelled=unlabelled), train, settings)
    assert seen == [10, 10]


def test_step_budget_does_not_shrink_with_the_labelled_set():
    settings = TrainSettings(60, 64, 1e-3, 0.0, 5, 0, min_steps=300)
    assert steps_per_round(50, settings) == 5  # one batch per pass: five passes per round
    assert steps_per_round(3000, settings) == 47  # big data: one pass per round, as before
    batches = list(round_batches(50, 64, 5, torch.Generator().manual_seed(0)))
    assert len(batches) == 5 and all(len(b) == 50 for b in batches)
    x, lengths = _sequences(20, 0)
    train = Samples.from_padded(x, lengths, torch.arange(20) % C)
    steps = []
    method = create_method("ce", DistillParams())
    real = method.forward
    method.forward = lambda model, batch: (steps.append(batch.step), real(model, batch))[1]
    small = TrainSettings(3, 64, 1e-3, 0.0, 0, 0, progress=False, min_steps=12)
    train_classifier(_student(), method, BatchSource(train, method, small), train, small)
    assert steps == list(range(12))


def test_auto_candidates_choice_and_variants():
    assert candidates(False, False) == ["ce", "joint", "joint_w0.1"]
    assert candidates(True, True) == ["ce", "joint", "joint_w0.1", "sinkhorn_ssl", "hinton_kd"]
    assert choose({"ce": 0.8, "joint": 0.85, "sinkhorn_ssl": 0.9}) == "sinkhorn_ssl"
    assert choose({"joint": 0.8, "ce": 0.8}) == "ce"  # ties go to the CE-only student
    with pytest.raises(ValueError, match="needs the 'ce' candidate"):
        choose({"joint": 0.8})
    method, params = resolve("joint_w0.1", DistillParams())
    assert method == "joint" and (params.w_fa, params.w_la) == (0.1, 0.1)
    assert set(VARIANTS) == {"joint_w0.1", "sinkhorn_ssl_sem"}
    method, params = resolve("sinkhorn_ssl_sem", DistillParams(ssl={"start": 7}))
    assert method == "sinkhorn_ssl" and params.ssl.semantic == 0.3
    assert params.ssl.start == 7  # a nested override keeps the section's other values
    with pytest.raises(KeyError, match="unknown method 'jointt'"):
        resolve("jointt", DistillParams())


def test_class_semantics_put_a_classes_mass_on_the_classes_the_teacher_finds_alike():
    import torch.nn.functional as F

    from cmkd_core.distill.methods.sinkhorn_ssl import class_semantics

    means = F.normalize(torch.tensor([[1.0, 0.1, 0.0], [1.0, 0.0, 0.1], [0.0, 1.0, 0.0]]), dim=1)
    k = class_semantics(means, temperature=0.05)
    assert torch.allclose(k.sum(1), torch.ones(3)) and torch.all(k.diagonal() == 0)
    assert k[0, 1] > 0.99 and k[1, 0] > 0.99  # classes 0 and 1 are alike, 2 is not
