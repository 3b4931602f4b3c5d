"""Distillation methods, one small module each, behind a registry.

Registered: ``ce``, ``fa``, ``la``, ``joint``, ``bilevel`` (the paper); ``prototype_kd`` and
``mmd`` (baselines without pairs); ``fixmatch`` (teacher-free semi-supervised baseline) and
``sinkhorn_ssl`` (teacher-guided, on unlabelled student data); ``hinton_kd``, ``fitnet`` and
``c2kd`` (baselines that need pairs and refuse unpaired data).
"""

from cmkd_core.distill.methods import (  # noqa: F401  (registration)
    bilevel,
    fixmatch,
    paired,
    sinkhorn_ssl,
    unpaired,
)
from cmkd_core.distill.methods.base import Batch, Method, MethodError
from cmkd_core.distill.methods.registry import (
    create_method,
    list_methods,
    method_class,
    register_method,
)

__all__ = [
    "Batch",
    "Method",
    "MethodError",
    "create_method",
    "list_methods",
    "method_class",
    "register_method",
]
