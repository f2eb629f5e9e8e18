"""Model registry: networks are built by name, so recipes and weights files refer to names."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from dds_perception.utils.errors import UsageError

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering a builder ``fn(**kwargs) -> nn.Module`` under ``name``."""

    def decorator(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _MODELS:
            raise UsageError(f"model {name!r} is already registered")
        _MODELS[name] = builder
        return builder

    return decorator


def list_models() -> list[str]:
    """Names of every registered model, sorted."""
    return sorted(_MODELS)


def get_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered model; ``model.build_args`` rebuilds it with ``get_model(**build_args)``.

    Common options: ``num_classes`` (0 = backbone only, no last conv / classifier) and
    ``width_mult``. Unknown names raise ``ValueError`` listing the known ones.
    """
    try:
        builder = _MODELS[name]
    except KeyError as error:
        raise UsageError(
            f"unknown model {name!r}; known models: {', '.join(list_models())}"
        ) from error
    model = builder(**kwargs)
    model.build_args = {"name": name, **kwargs}
    return model
