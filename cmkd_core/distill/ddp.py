"""Data-parallel distillation over several processes (``torchrun``), equal to one process.

Why not plain DDP sharding
--------------------------
The alignment terms are not sums over samples: FA solves one optimal-transport problem between
all student features of a batch and all its teacher rows, LA and MMD depend on the batch as a
whole too. Giving each rank ``1/world`` of the batch and averaging the per-rank gradients would
optimise the mean of ``world`` small-batch losses, a different objective.

The scheme here
---------------
* Every rank draws the same global batch: :func:`train_classifier` is reused as it is, and its
  batch generator is seeded with ``settings.seed`` on every rank, so indices, class-matched
  teacher rows, augmentation and unlabelled draws agree everywhere.
* :class:`ShardedClassifier` stands in for the student. Its ``features(*inputs)`` runs the
  encoder on this rank's contiguous slice of the rows only (the costly part) and gathers the
  slices of all ranks with :func:`gather_rows`, an all-gather that keeps autograd: the result
  is the full ``(B, d)`` feature matrix in batch order. The method's loss (head, projector, OT,
  LA, CE) is then computed on the whole global batch, identically on every rank.
* Gradients: call the loss ``L`` (the same on every rank) and ``f_r`` the features of slice
  ``r``. The backward of the gather sums, over ranks, the gradient each rank sends to ``f_r``;
  all ranks send ``dL/df_r``, so rank ``r`` receives ``world * dL/df_r`` and its encoder gradient
  is ``world`` times slice ``r``'s share of ``dL/dθ``. The head, projector and method parameters
  act on the gathered features on every rank, so every rank already holds their full gradient.
  Averaging every gradient over ranks therefore gives, for the encoder,
  ``sum_r world * share_r / world = dL/dθ`` and for the rest ``world * dL/dθ / world``: the
  single-process gradient of the global batch, for all parameters alike.
* The average is an ``all_reduce`` in a gradient hook on each parameter
  (:func:`averaged_gradients`), so it happens inside ``backward()``: the shared
  :func:`~cmkd_core.distill.loop.train_step` then clips and steps on the averaged gradient
  exactly as in one process. ``DistributedDataParallel`` is not used: it expects the whole loss
  to flow from its wrapped module's ``forward``, whereas methods call ``features``, ``head`` and
  ``projector`` separately, and some parameters receive no gradient under some methods (the
  projector under ``ce``), which DDP only tolerates with ``find_unused_parameters`` and its
  graph walk. A hook per parameter is the same averaging with none of that.

Every rank ends with the same weights, history and selected epoch. Validation runs on the full
val split in every rank (replicated, no communication). The result equals a single-process run
with the same global batch up to float rounding, provided the model has no dropout active and
no batch statistics: dropout masks are drawn per rank for its slice (statistically equivalent,
not bitwise), and batch normalisation would see per-slice statistics (the encoders here have
none). ``bilevel`` overrides :meth:`Method.forward` with inner optimisation steps on a copy of
the student and is refused.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import replace

import torch
import torch.distributed as dist
from torch import nn

from cmkd_core.data.tensors import Samples
from cmkd_core.distill.batches import BatchSource
from cmkd_core.distill.methods import Method, MethodError
from cmkd_core.distill.train import ClassPrior, TrainResult, TrainSettings, train_classifier
from cmkd_core.models import Classifier

Group = dist.ProcessGroup | None


class DistributedSetupError(ValueError):
    """The process group or the settings cannot give a run equal to one process."""


def check_global_batch(batch_size: int, world_size: int) -> int:
    """Return the per-rank batch ``batch_size // world_size``; raise if it does not divide."""
    if world_size < 1:
        raise DistributedSetupError(f"world size must be at least 1, got {world_size}")
    if batch_size % world_size:
        raise DistributedSetupError(
            f"global batch size {batch_size} is not divisible by world size {world_size}: "
            f"each rank must encode an equal slice; choose a batch size that is a multiple "
            f"of {world_size}"
        )
    return batch_size // world_size


def shard_sizes(n: int, world_size: int) -> list[int]:
    """Rows of each rank's contiguous slice of ``n`` rows (as :func:`torch.tensor_split`):
    the first ``n % world_size`` ranks get one row more."""
    if n < world_size:
        raise DistributedSetupError(
            f"a batch of {n} rows cannot be split over world size {world_size}: "
            "every rank needs at least one row"
        )
    base, extra = divmod(n, world_size)
    return [base + (rank < extra) for rank in range(world_size)]


class _GatherRows(torch.autograd.Function):
    """All ranks' row slices concatenated; backward sums the gradients over ranks and returns
    this rank's rows of the sum."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, sizes: Sequence[int], group: Group) -> torch.Tensor:
        rank = dist.get_rank(group)
        ctx.rows, ctx.group = (sum(sizes[:rank]), sizes[rank]), group
        longest = max(sizes)  # the collective needs equal shapes: pad, then trim
        padded = local.new_zeros((longest, *local.shape[1:]))
        padded[: local.shape[0]] = local
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded, group=group)
        return torch.cat([part[:n] for part, n in zip(parts, sizes, strict=True)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        total = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total, group=ctx.group)
        start, n = ctx.rows
        return total[start : start + n], None, None


def gather_rows(local: torch.Tensor, sizes: Sequence[int], group: Group = None) -> torch.Tensor:
    """Concatenate every rank's ``local (sizes[rank], ...)`` into ``(sum(sizes), ...)`` in rank
    order, differentiably.

    The backward gives each rank's slice the sum of the gradients all ranks send to it (as
    ``torch.distributed.nn.functional.all_gather`` does, which is deprecated in torch 2.13);
    see the module docstring for why that, averaged over ranks, is exact.
    """
    if local.shape[0] != sizes[dist.get_rank(group)]:
        raise DistributedSetupError(
            f"rank {dist.get_rank(group)} holds {local.shape[0]} rows, expected "
            f"{sizes[dist.get_rank(group)]}"
        )
    return _GatherRows.apply(local, list(sizes), group)


class ShardedClassifier(nn.Module):
    """A :class:`Classifier` whose ``features`` are computed slice-wise across ranks.

    ``features(*inputs)`` takes the full global batch (every tensor of ``inputs`` has ``B``
    rows, e.g. ``x (B, T, F)`` and ``lengths (B,)``), encodes this rank's contiguous slice of
    ``shard_sizes(B, world)[rank]`` rows and returns the gathered features ``(B, d)``, identical
    on every rank and differentiable. ``head`` and ``projector`` are the wrapped classifier's;
    ``forward`` (used by validation) runs the whole classifier locally, without communication.
    The wrapped model's weights live in ``self.classifier``.
    """

    def __init__(self, classifier: Classifier, group: Group = None):
        super().__init__()
        self.classifier = classifier
        self.group = group

    @property
    def head(self) -> nn.Module:
        return self.classifier.head

    @property
    def projector(self) -> nn.Module:
        return self.classifier.projector

    def features(self, *inputs: torch.Tensor) -> torch.Tensor:
        """Gathered encoder features ``(B, feature_dim)`` of the global batch ``inputs``."""
        world = dist.get_world_size(self.group)
        rank = dist.get_rank(self.group)
        sizes = shard_sizes(int(inputs[0].shape[0]), world)
        start = sum(sizes[:rank])
        local = self.classifier.features(*(t[start : start + sizes[rank]] for t in inputs))
        return gather_rows(local, sizes, self.group)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes)`` of the whole batch, computed on this rank alone."""
        return self.classifier(*inputs)


def _average_hook(world: int, group: Group):
    def hook(grad: torch.Tensor) -> torch.Tensor:
        total = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total, group=group)
        return total.div_(world)

    return hook


@contextlib.contextmanager
def averaged_gradients(modules: Iterable[nn.Module], group: Group = None) -> Iterator[None]:
    """Within the block, every gradient of the trainable parameters of ``modules`` is averaged
    over the ranks of ``group`` as ``backward()`` produces it, before it reaches ``.grad``.

    Ranks must run the same autograd graph (they do here: the loss is computed on the global
    batch everywhere), so the hooks issue their collectives in the same order on every rank.
    """
    world = dist.get_world_size(group)
    params = {id(p): p for m in modules for p in m.parameters() if p.requires_grad}
    handles = [p.register_hook(_average_hook(world, group)) for p in params.values()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def broadcast_state(modules: Iterable[nn.Module], src: int = 0, group: Group = None) -> None:
    """Copy every parameter and buffer of ``modules`` from rank ``src`` to all ranks."""
    for module in modules:
        for tensor in module.state_dict().values():
            dist.broadcast(tensor, src, group=group)


def train_classifier_ddp(
    model: Classifier,
    method: Method,
    batches: BatchSource,
    val: Samples,
    settings: TrainSettings,
    *,
    desc: str = "train",
    group: Group = None,
    prior: ClassPrior | None = None,
) -> TrainResult:
    """:func:`~cmkd_core.distill.train.train_classifier` over the ranks of an initialised
    process group, equal to one process with global batch ``settings.batch_size``.

    Every rank passes the same arguments (``batches`` over the full training samples and the
    full ``val`` samples, on its own device); ``settings.batch_size`` is the global batch and
    must be a multiple of the world size. Rank 0's weights are broadcast first; every rank
    ends with the same weights (those of the best validation epoch, in ``model``) and returns
    the same result. Only rank 0 shows progress. Raises :class:`DistributedSetupError` or
    :class:`MethodError` before training.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise DistributedSetupError(
            "train_classifier_ddp needs an initialised process group "
            "(torch.distributed.init_process_group, e.g. under torchrun)"
        )
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    check_global_batch(settings.batch_size, world)
    if type(method).forward is not Method.forward or batches.views is not None:
        raise MethodError(
            f"method {method.name!r} runs its own optimisation inside a step and has no "
            "data-parallel form here; train it in a single process"
        )
    method.to(next(model.parameters()).device)
    broadcast_state([model, method], 0, group)
    if rank > 0:  # distinct dropout masks per slice (rank 0 keeps the caller's stream)
        torch.manual_seed(settings.seed + 7919 * rank)
    settings = replace(settings, progress=settings.progress and rank == 0)
    sharded = ShardedClassifier(model, group)
    with averaged_gradients([model, method], group):
        return train_classifier(
            sharded,  # type: ignore[arg-type]  (duck-types Classifier for the method)
            method,
            batches,
            val,
            settings,
            desc=desc,
            prior=prior,
        )
