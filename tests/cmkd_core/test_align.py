"""Feature and label alignment against direct computations, gradients, plan marginals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cmkd_core.align import COSTS, cost_matrix, feature_alignment, label_alignment, transport_plan


def _sinkhorn_reference(m: np.ndarray, reg: float, iters: int = 5000) -> float:
    """Entropic OT value <T, M> + reg * KL(T | a b^T), uniform weights, log domain (float64)."""
    n, k = m.shape
    log_a, log_b = np.full(n, -np.log(n)), np.full(k, -np.log(k))
    f, g = np.zeros(n), np.zeros(k)
    for _ in range(iters):
        f = reg * (log_a - np.logaddexp.reduce((g[None, :] - m) / reg, axis=1))
        g = reg * (log_b - np.logaddexp.reduce((f[:, None] - m) / reg, axis=0))
    plan = np.exp((f[:, None] + g[None, :] - m) / reg)
    ab = np.exp(log_a[:, None] + log_b[None, :])
    return float((plan * m).sum() + reg * (plan * np.log(plan / ab)).sum())


def test_feature_alignment_matches_direct_sinkhorn():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(5, 3, generator=gen), torch.randn(6, 3, generator=gen)
    xn, yn = x / x.norm(dim=1, keepdim=True), y / y.norm(dim=1, keepdim=True)
    m = (1 - xn @ yn.T).double().numpy()
    want = _sinkhorn_reference(m, reg=0.5)
    got = feature_alignment(x, y, cost="cosine", reg=0.5, num_iter=2000)
    assert got.item() == pytest.approx(want, abs=1e-4)


def test_cosine_cost_matches_formula():
    x, y = torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([[1.0, 1.0]])
    m = cost_matrix(x, y, "cosine")
    expected = 1 - torch.tensor([[1 / np.sqrt(2)], [1 / np.sqrt(2)]], dtype=torch.float32)
    assert torch.allclose(m, expected, atol=1e-6)


@pytest.mark.parametrize("cost", COSTS)
def test_gradients_reach_student_and_are_finite_in_float32(cost):
    gen = torch.Generator().manual_seed(1)
    student = torch.randn(512, 64, generator=gen, requires_grad=True)
    teacher = torch.randn(512, 64, generator=gen) * 5.0
    loss = feature_alignment(student, teacher, cost=cost, reg=0.01, num_iter=100)
    loss.backward()
    assert student.grad is not None and student.grad.shape == student.shape
    assert torch.isfinite(student.grad).all()
    assert student.grad.abs().sum() > 0


def test_plan_marginals_equal_uniform_weights():
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(7, 4, generator=gen), torch.randn(9, 4, generator=gen)
    plan = transport_plan(x, y, reg=0.1, num_iter=5000)
    assert plan.shape == (7, 9)
    assert torch.allclose(plan.sum(1), torch.full((7,), 1 / 7), atol=1e-5)
    assert torch.allclose(plan.sum(0), torch.full((9,), 1 / 9), atol=1e-5)


def test_identical_clouds_align_better_than_shuffled_classes():
    gen = torch.Generator().manual_seed(3)
    y = torch.randn(32, 8, generator=gen)
    same = feature_alignment(y.clone(), y)
    other = feature_alignment(torch.randn(32, 8, generator=gen), y)
    assert same < other


def test_bad_shapes_name_the_tensors():
    with pytest.raises(ValueError, match=r"student features .* teacher features"):
        feature_alignment(torch.randn(4, 3), torch.randn(4, 5))
    with pytest.raises(ValueError, match="unknown OT cost 'hamming'"):
        cost_matrix(torch.randn(2, 3), torch.randn(2, 3), "hamming")  # type: ignore[arg-type]


@pytest.mark.parametrize("form,sign", [("aligned", 1.0), ("reference", -1.0)])
def test_label_alignment_matches_formula(form, sign):
    gen = torch.Generator().manual_seed(4)
    s, z = torch.randn(6, 4, generator=gen), torch.randn(6, 4, generator=gen)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    kappa_y = F.softmax(z, 1)[torch.arange(6), y]
    expected = F.cross_entropy(s, y, reduction="none") + sign * kappa_y * F.cross_entropy(
        z, y, reduction="none"
    )
    got = label_alignment(s, z, y, form=form)
    assert got.item() == pytest.approx(expected.mean().item(), abs=1e-6)


def test_aligned_label_term_pulls_features_towards_the_right_class():
    head = torch.nn.Linear(2, 2)
    with torch.no_grad():
        head.weight.copy_(torch.eye(2))
        head.bias.zero_()
    f = torch.tensor([[0.0, 0.0]], requires_grad=True)
    label_alignment(torch.zeros(1, 2), head(f), torch.tensor([0]), "aligned").backward()
    # Descending the gradient raises the logit of class 0 relative to class 1.
    assert (f.grad[0, 0] < 0) and (f.grad[0, 1] > 0)


def test_label_alignment_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="teacher_head_logits"):
        label_alignment(torch.randn(3, 4), torch.randn(3, 5), torch.zeros(3, dtype=torch.long))


def test_label_cost_makes_the_plan_class_conditional():
    gen = torch.Generator().manual_seed(5)
    x, y = torch.randn(8, 4, generator=gen), torch.randn(8, 4, generator=gen)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    m = cost_matrix(x, y) + 10.0 * (labels[:, None] != labels[None, :]).float()
    from cmkd_core.align.feature import _solve

    plan = _solve(m, reg=0.1, num_iter=1000).plan
    off_class = plan[labels[:, None] != labels[None, :]].sum()
    assert off_class < 1e-6  # all mass stays within each class
    plain = feature_alignment(x, y, reg=0.1)
    conditional = feature_alignment(x, y, reg=0.1, labels=(labels, labels), label_cost=10.0)
    assert conditional > plain  # the class constraint can only make transport dearer


@pytest.mark.parametrize("reg", [0.5, 0.1, 0.05, 0.01, 0.005])  # kernel form down to 0.05
@pytest.mark.parametrize("cost", ["cosine", "sqeuclidean"])
def test_torch_sinkhorn_equals_pot_in_value_and_gradient(reg, cost):
    gen = torch.Generator().manual_seed(3)
    y = torch.randn(48, 16, generator=gen)
    grads, values = {}, {}  # of the same student features, one solver each
    for solver in ("torch", "pot"):
        x = (torch.randn(40, 16, generator=gen.manual_seed(4)) + 0.3).requires_grad_()
        values[solver] = feature_alignment(x, y, cost, reg, 100, solver=solver)
        (grads[solver],) = torch.autograd.grad(values[solver], x)
    # Same updates in the same order (unconverged at small reg after 100 iterations, too).
    assert float(values["torch"]) == pytest.approx(float(values["pot"]), abs=1e-5)
    assert torch.isfinite(grads["torch"]).all()
    torch.testing.assert_close(grads["torch"], grads["pot"], atol=1e-5, rtol=1e-3)


def test_torch_sinkhorn_matches_a_float64_reference_and_stops_early():
    from cmkd_core.align.sinkhorn import sinkhorn_log

    gen = torch.Generator().manual_seed(5)
    m = torch.rand(7, 9, generator=gen)
    for reg in (0.2, 0.02):  # the kernel form, then the log form
        result = sinkhorn_log(m, reg, max_iter=5000, tol=1e-6)
        assert float(result.value) == pytest.approx(_sinkhorn_reference(m.double().numpy(), reg))
        assert result.iterations < 5000  # converged: the tolerance stopped it
        torch.testing.assert_close(result.plan.sum(1), torch.full((7,), 1 / 7), atol=1e-6, rtol=0)
        torch.testing.assert_close(result.plan.sum(0), torch.full((9,), 1 / 9), atol=1e-6, rtol=0)
    assert sinkhorn_log(m, 0.02, max_iter=3).iterations == 3


def test_torch_sinkhorn_refuses_bad_input():
    from cmkd_core.align.sinkhorn import sinkhorn_log

    with pytest.raises(ValueError, match="cost matrix must be"):
        sinkhorn_log(torch.zeros(0, 3), 0.1)
    with pytest.raises(ValueError, match="reg must be positive"):
        sinkhorn_log(torch.zeros(2, 3), 0.0)
    with pytest.raises(ValueError, match="unknown OT solver"):
        feature_alignment(torch.randn(3, 2), torch.randn(3, 2), solver="scipy")  # type: ignore[arg-type]
