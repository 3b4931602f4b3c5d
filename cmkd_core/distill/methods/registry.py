"""A decorator registry of distillation methods: ``create_method(name, params, bank)``.

Nothing here reads params: each method takes its settings from them
(:meth:`~cmkd_core.distill.methods.base.Method.from_params`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cmkd_core.bank import TeacherBank
    from cmkd_core.distill.methods.base import Method

_METHODS: dict[str, type[Method]] = {}


def register_method(name: str):
    """Register a :class:`Method` subclass under ``name`` (and set its ``name``)."""

    def wrap(cls: type[Method]) -> type[Method]:
        if name in _METHODS:
            raise ValueError(f"method {name!r} is already registered")
        cls.name = name
        _METHODS[name] = cls
        return cls

    return wrap


def list_methods() -> list[str]:
    """Registered method names, in registration order."""
    return list(_METHODS)


def method_class(name: str) -> type[Method]:
    """The class registered as ``name``; an unknown name lists the valid ones."""
    if name not in _METHODS:
        raise KeyError(f"unknown method {name!r}; valid methods: {', '.join(_METHODS)}")
    return _METHODS[name]


def create_method(name: str, params, bank: TeacherBank | None = None) -> Method:
    """Build method ``name`` configured by distill ``params`` (``DistillParams``) with the
    teacher ``bank``."""
    return method_class(name).from_params(params, bank)
