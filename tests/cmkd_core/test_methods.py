"""Every registered method on a tiny case; pairs refused where needed; the bilevel step."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F

from cmkd_core.align import FeatureAligner, label_alignment
from cmkd_core.bank import TeacherBank, restrict_bank
from cmkd_core.config import DistillParams
from cmkd_core.data.presets import domain_shift, preset
from cmkd_core.data.tensors import Samples
from cmkd_core.distill import TrainSettings, train_classifier
from cmkd_core.distill.batches import BatchSource
from cmkd_core.distill.methods import Batch, MethodError, create_method, list_methods, method_class
from cmkd_core.models import Classifier, create_model

C, D_T = 4, 12


def _bank(n: int = 80) -> TeacherBank:
    gen = torch.Generator().manual_seed(0)
    return TeacherBank(
        features=torch.randn(n, D_T, generator=gen).abs(),
        labels=torch.arange(n) % C,
        splits=torch.zeros(n, dtype=torch.long),
        head_weight=torch.randn(C, D_T, generator=gen),
        head_bias=torch.zeros(C),
        classes=tuple("abcd"),
        ids=tuple(f"t{i}" for i in range(n)),
    )


def _student(seed: int = 0) -> Classifier:
    torch.manual_seed(seed)
    return Classifier(create_model("sequence_cnn", sample_shape=(5,), feature_dim=8), C, D_T)


def _batch(bank: TeacherBank, b: int = 8, unlabelled: bool = False) -> Batch:
    gen = torch.Generator().manual_seed(1)
    labels = torch.arange(b) % C
    inputs = (torch.randn(b, 7, 5, generator=gen), torch.full((b,), 7))
    batch = Batch(inputs, labels, bank.features[:b])
    if unlabelled:
        batch.unlabelled = (torch.randn(6, 7, 5, generator=gen), torch.full((6,), 7))
        batch.unlabelled_teacher = bank.features[10:16]
    return batch


def test_registry_holds_the_paper_methods_and_baselines():
    assert {
        "ce",
        "fa",
        "la",
        "joint",
        "bilevel",
        "prototype_kd",
        "mmd",
        "hinton_kd",
        "fitnet",
        "c2kd",
    } <= set(list_methods())
    with pytest.raises(KeyError, match="unknown method 'dkd'; valid methods: ce, fa"):
        method_class("dkd")


@pytest.mark.parametrize("name", list_methods())
def test_method_loss_is_finite_and_gradients_reach_the_student(name):
    bank, model = _bank(), _student()
    method = create_method(name, DistillParams(), bank)
    terms = method(model, _batch(bank))
    assert torch.isfinite(terms["loss"]) and "ce" in terms
    terms["loss"].backward()
    grads = [p.grad for p in model.encoder.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


@pytest.mark.parametrize("name", ["fa", "la", "joint", "bilevel", "mmd", "prototype_kd"])
def test_teacher_terms_are_present_for_distillation_methods(name):
    bank = _bank()
    terms = create_method(name, DistillParams(), bank)(_student(), _batch(bank))
    assert set(terms) - {"ce", "loss"}, f"{name} adds no teacher term"


def test_semi_supervised_option_adds_fa_on_unlabelled_samples():
    bank = _bank()
    method = create_method("joint", DistillParams(unlabelled=True), bank)
    terms = method(_student(), _batch(bank, unlabelled=True))
    assert {"fa", "la", "fa_unlabelled"} <= set(terms)
    plain = create_method("joint", DistillParams(unlabelled=False), bank)
    assert "fa_unlabelled" not in plain(_student(), _batch(bank, unlabelled=True))


def test_a_method_is_configured_once_with_the_settings_it_uses_and_no_params_object():
    bank = _bank()
    params = DistillParams(
        w_fa=0.3, w_la=0.7, la_form="reference", ot={"reg": 0.2}, unlabelled=True
    )
    method = create_method("joint", params, bank)
    assert not hasattr(method, "params")
    assert (method.w_fa, method.w_la, method.la_form, method.alignment.reg) == (
        0.3,
        0.7,
        "reference",
        0.2,
    )
    direct = method_class("joint")(
        bank,
        w_fa=0.3,
        w_la=0.7,
        la_form="reference",
        label_smoothing=params.label_smoothing,
        alignment=FeatureAligner(reg=0.2),
        unlabelled_fa=params.w_fa,
    )
    batch = _batch(bank, unlabelled=True)
    made, built = method(_student(), batch), direct(_student(), batch)
    assert set(made) == set(built) and all(torch.equal(made[k], built[k]) for k in made)
    with pytest.raises(TypeError, match="w_kd"):
        method_class("joint")(bank, w_kd=1.0)  # a setting joint does not use


@pytest.mark.parametrize("name", ["hinton_kd", "fitnet", "c2kd"])
def test_paired_only_methods_refuse_unpaired_data(name):
    bank = _bank()
    x = torch.randn(16, 7, 5)
    train = Samples.from_padded(x, torch.full((16,), 7), torch.arange(16) % C)
    settings = TrainSettings(1, 8, 1e-3, 0.0, 0, 0, progress=False)
    method = create_method(name, DistillParams(), bank)
    with pytest.raises(
        MethodError, match=f"method '{name}' needs instance pairs and refuses unpaired"
    ):
        BatchSource(train, method, settings, bank=bank, pairing="unpaired")
    with pytest.raises(MethodError, match="training samples carry no pair keys"):
        BatchSource(train, method, settings, bank=bank, pairing="paired")
    train.pair_index = torch.arange(16)
    batches = BatchSource(train, method, settings, bank=bank, pairing="paired")
    result = train_classifier(_student(), method, batches, train, settings)
    assert result.best_epoch == 1


def test_bilevel_moves_the_student_only_through_the_copied_gradient():
    bank, model = _bank(), _student().eval()  # eval: no dropout, so the step can be replayed
    params = DistillParams(inner_lr=1e-2)
    method = create_method("bilevel", params, bank)
    batch = _batch(bank)
    before = copy.deepcopy(model.state_dict())
    terms = method(model, batch)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), f"{name} changed before the outer step"
    terms["loss"].backward()
    # Replay: inner AdamW steps on FA then LA (features detached), CE gradient at the copy.
    replay = copy.deepcopy(_student().eval())
    replay.load_state_dict(before)
    inner = torch.optim.AdamW(replay.parameters(), lr=1e-2, weight_decay=0.05)
    inner.zero_grad()
    method.fa(replay, replay.features(*batch.inputs), batch.teacher_features).backward()
    inner.step()
    inner.zero_grad()
    f = replay.features(*batch.inputs).detach()
    z = method.teacher_head(replay.projector(f))
    label_alignment(replay.head(f), z, batch.labels, params.la_form).backward()
    inner.step()
    ce = F.cross_entropy(replay(*batch.inputs), batch.labels, label_smoothing=0.1)
    expected = torch.autograd.grad(ce, list(replay.parameters()), allow_unused=True)
    for (name, p), g in zip(model.named_parameters(), expected, strict=True):
        if g is None:
            assert p.grad is None or not p.grad.abs().sum(), name
        else:
            assert torch.allclose(p.grad, g, atol=1e-6), name
    assert terms["loss"].item() == pytest.approx(ce.item(), abs=1e-6)


def test_robustness_presets_thin_the_bank_and_shift_the_inputs():
    bank = _bank(400)
    hard = restrict_bank(bank, preset("hard"), seed=0)
    counts = torch.bincount(hard.labels, minlength=C)
    assert counts[0] == round(0.3 * 100) and counts[-1] == max(1, round(0.3 * 100 / 50))
    assert len(hard.ids) == len(hard.labels)
    assert restrict_bank(bank, preset("clean"), 0) is bank
    x = (torch.ones(3, 4, 5), torch.full((3,), 4))
    shifted = domain_shift(0.5, torch.ones(5))(x, torch.Generator().manual_seed(0))
    assert shifted[0].shape == x[0].shape and not torch.equal(shifted[0], x[0])
    assert torch.equal(shifted[1], x[1])
    with pytest.raises(KeyError, match="valid: clean, mild"):
        preset("extreme")


def test_bf16_autocast_keeps_the_ot_in_float32_and_the_loss_close():
    from cmkd_core.align import feature as feature_module
    from cmkd_core.distill.loop import train_step

    bank = _bank()
    seen: list[torch.dtype] = []
    real = feature_module._solve

    def spy(m, *args):
        seen.append(m.dtype)
        return real(m, *args)

    losses = {}
    for amp in (False, True):
        model = _student()
        method = create_method("joint", DistillParams(), bank)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        feature_module._solve = spy
        try:
            step = functools.partial(method, model)
            terms = train_step(model, step, _batch(bank), optimizer, amp=amp)
        finally:
            feature_module._solve = real
        losses[amp] = float(terms["loss"])
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert seen == [torch.float32, torch.float32]  # the cost matrix, with and without autocast
    assert losses[True] == pytest.approx(losses[False], rel=0.05)
