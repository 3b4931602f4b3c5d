"""A decorator registry of model builders: ``create_model(name, **kwargs)``."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Register a builder under ``name``; registering a name twice is an error."""

    def wrap(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _MODELS:
            raise ValueError(f"model {name!r} is already registered")
        _MODELS[name] = builder
        return builder

    return wrap


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`, sorted."""
    return sorted(_MODELS)


def create_model(name: str, **kwargs: object) -> nn.Module:
    """Build the encoder registered as ``name``; an unknown name lists the valid ones."""
    if name not in _MODELS:
        raise KeyError(f"unknown model {name!r}; valid models: {', '.join(list_models())}")
    return _MODELS[name](**kwargs)
