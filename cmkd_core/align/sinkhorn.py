"""A bounded Sinkhorn in plain torch, with the envelope gradient.

For a cost ``M (n, m)`` between uniform weights ``a = 1/n``, ``b = 1/m`` and regularisation
``reg``, the entropic OT value is

    OT(M) = min_{T 1 = a, T^T 1 = b}  <T, M> + reg * KL(T | a b^T),

with optimal plan ``T_ij = a_i b_j exp((f_i + g_j - M_ij) / reg)`` for dual potentials
``f (n,)``, ``g (m,)``. The iterations alternate ``g`` and ``f`` updates under
``torch.no_grad``, at most ``max_iter`` of them, in POT's order and with POT's stopping rule:
the column marginals of the plan within ``tol`` (l2) of ``b``, checked after the first
iteration and then every ``check_every``, so a GPU synchronises with the host only then. When
``M / reg`` spans at most ``KERNEL_RANGE`` (the default cosine cost in [0, 2] at ``reg`` 0.1
spans 20), the updates are the classic scaling form: two matrix-vector products with the kernel
``exp(-M / reg)``; otherwise ``logsumexp`` updates, finite in float32 at any ``reg``. Both give
the same potentials. The value is ``<T, M> + reg * KL(T | a b^T)`` with ``T`` held fixed: by
the envelope theorem its gradient with respect to ``M`` is ``T``, so nothing back-propagates
through the iterations (memory does not grow with them). This is what POT's
``ot.solve(M, a, b, reg, grad="envelope")`` computes, without POT's per-call overhead (backend
dispatch, argument checks, result objects) and with the cheaper kernel form where it is safe
(``bench/distill.py --solvers`` compares them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Largest spread of ``M / reg`` for the kernel form: entries of ``exp(-M / reg)`` down to
# ``exp(-30)`` (about 1e-13) keep the scalings within float32's range.
KERNEL_RANGE = 30.0


@dataclass(frozen=True)
class SinkhornResult:
    """``value``: scalar tensor, differentiable in ``M``; ``plan (n, m)``; ``iterations``: how
    many were run (``max_iter`` when the tolerance was not reached)."""

    value: torch.Tensor
    plan: torch.Tensor
    iterations: int


def sinkhorn_log(
    m: torch.Tensor,
    reg: float,
    max_iter: int = 100,
    tol: float = 1e-7,
    check_every: int = 10,
) -> SinkhornResult:
    """Entropic OT between uniform weights for the cost ``m (n, m)`` (module docstring).

    ``m`` may require grad; the returned value's gradient with respect to it is the plan.
    Raises ``ValueError`` for an empty or non-2-D cost or a non-positive ``reg``.
    """
    if m.ndim != 2 or m.shape[0] == 0 or m.shape[1] == 0:
        raise ValueError(f"cost matrix must be (n, m) with n, m > 0, got {tuple(m.shape)}")
    if not reg > 0:
        raise ValueError(f"reg must be positive, got {reg}")
    n, k = m.shape
    log_a, log_b = -math.log(n), -math.log(k)
    with torch.no_grad():
        scaled = m.detach() / reg
        if float(scaled.max() - scaled.min()) <= KERNEL_RANGE:
            f, g, done = _kernel_iterations(scaled, log_a, log_b, max_iter, tol, check_every)
        else:
            f, g, done = _log_iterations(scaled, log_a, log_b, max_iter, tol, check_every)
        log_plan = f[:, None] + g[None, :] - scaled + (log_a + log_b)
        plan = log_plan.exp()
        kl = (plan * (log_plan - (log_a + log_b))).sum()
    value = (plan * m).sum() + reg * kl
    return SinkhornResult(value, plan, done)


def _log_iterations(scaled, log_a, log_b, max_iter, tol, check_every):
    """Potentials ``f (n,)``, ``g (m,)`` (in units of ``reg``) by log-sum-exp updates."""
    n, k = scaled.shape
    f = torch.zeros(n, dtype=scaled.dtype, device=scaled.device)
    g = torch.zeros(k, dtype=scaled.dtype, device=scaled.device)
    done = 0
    while done < max_iter:
        g = -torch.logsumexp(f[:, None] - scaled + log_a, dim=0)
        f = -torch.logsumexp(g[None, :] - scaled + log_b, dim=1)
        done += 1
        if (done - 1) % check_every == 0:
            columns = torch.logsumexp(f[:, None] + g[None, :] - scaled + log_a, dim=0).exp()
            if float(torch.linalg.vector_norm(columns - 1.0)) * math.exp(log_b) < tol:
                break
    return f, g, done


def _kernel_iterations(scaled, log_a, log_b, max_iter, tol, check_every):
    """The same potentials by scaling vectors ``v = b / (K^T u)``, ``u = a / (K v)`` with the
    kernel ``K = exp(-(M - min M) / reg)``: two matrix-vector products an iteration instead of
    two passes of ``exp`` over the matrix. Used when the kernel's entries span at most
    ``exp(KERNEL_RANGE)``, so that neither they nor the scalings leave float32's range."""
    shift = scaled.min()
    kernel = torch.exp(shift - scaled)
    a, b = math.exp(log_a), math.exp(log_b)
    u = torch.ones(scaled.shape[0], dtype=scaled.dtype, device=scaled.device)
    done = 0
    while done < max_iter:
        v = b / (kernel.T @ u)
        u = a / (kernel @ v)
        done += 1
        checked = (done - 1) % check_every == 0
        if checked and float(torch.linalg.vector_norm(v * (kernel.T @ u) - b)) < tol:
            break
    # T = diag(u) K diag(v) = a b exp(f + g - M / reg): back to the potentials of the log form
    f = torch.log(u) - log_a + shift
    g = torch.log(v) - log_b
    return f, g, done
