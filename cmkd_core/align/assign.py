"""Balanced soft assignment of samples to classes by entropic optimal transport.

For a cost ``M (n, C)`` between ``n`` samples and ``C`` classes, uniform sample weights
``a = 1/n`` and class weights ``b (C,)`` (the teacher bank's class proportions), the plan

    T = argmin_{T 1 = a, T^T 1 = b}  <T, M> - eps * H(T)

spreads the batch over the classes in the proportions ``b`` while each sample goes where its
cost is low. Its rows, rescaled to sum to one, are soft class targets ``q (n, C)``. A batch
whose samples all look alike is still spread over every class, which keeps a semi-supervised
student from collapsing onto its most confident classes.
"""

from __future__ import annotations

import math

import torch


@torch.no_grad()
def balanced_assignment(
    cost: torch.Tensor, class_weights: torch.Tensor, eps: float = 0.05, iterations: int = 50
) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft targets ``q (n, C)`` (rows sum to 1) and the plan ``T (n, C)`` (module docstring).

    ``cost (n, C)``; ``class_weights (C,)`` non-negative, summing to one. The plan's row sums
    are ``1/n`` and its column sums ``class_weights``, up to the ``iterations`` log-domain
    Sinkhorn iterations run (the column marginals are exact after the last one). No gradient.
    """
    if cost.ndim != 2 or cost.shape[0] == 0:
        raise ValueError(f"cost must be (n, C) with n > 0, got {tuple(cost.shape)}")
    if class_weights.shape != (cost.shape[1],):
        raise ValueError(
            f"class_weights must have shape ({cost.shape[1]},), got {tuple(class_weights.shape)}"
        )
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")
    scaled = -cost.float() / eps
    log_a = torch.full((cost.shape[0],), -math.log(cost.shape[0]), device=cost.device)
    log_b = class_weights.float().clamp_min(1e-12).log()
    f = torch.zeros_like(log_a)
    g = torch.zeros_like(log_b)
    for _ in range(iterations):
        f = log_a - torch.logsumexp(scaled + g[None, :], dim=1)
        g = log_b - torch.logsumexp(scaled + f[:, None], dim=0)
    plan = (scaled + f[:, None] + g[None, :]).exp()
    return plan / plan.sum(1, keepdim=True), plan
