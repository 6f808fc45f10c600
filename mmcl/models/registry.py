"""Model registry: configs name a tower ("vit", "text_transformer", "mlp", ...) and its kwargs.

Usage:
  @register_model("vit")
  class ViT(nn.Module): ...

  tower = get_model("vit", patch_size=16, width=768, ...)

The table is filled by the decorators when `mmcl.models` is imported (its `__init__` imports every
model module) and is read-only afterwards; registering a name twice is an error, so import order
can never silently change which class a name means.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, TypeVar

import flax.linen as nn

ModuleT = TypeVar("ModuleT", bound=type[nn.Module])

_REGISTRY: dict[str, type[nn.Module]] = {}


def register_model(name: str) -> Callable[[ModuleT], ModuleT]:
  """Class decorator registering a Flax module class under `name`.

  Raises:
    ValueError: if `name` is already registered to a different class.
  """
  def decorator(cls: ModuleT) -> ModuleT:
    existing = _REGISTRY.get(name)
    if existing is not None and existing is not cls:
      raise ValueError(
          f"register_model: name {name!r} is already registered to "
          f"{existing.__module__}.{existing.__qualname__}; cannot register "
          f"{cls.__module__}.{cls.__qualname__} under it.")
    _REGISTRY[name] = cls
    return cls
  return decorator


def list_models() -> list[str]:
  """Sorted names of all registered models."""
  return sorted(_REGISTRY)


def get_model_class(name: str) -> type[nn.Module]:
  """Returns the class registered under `name`.

  Raises:
    KeyError: for an unknown name, listing the known ones.
  """
  try:
    return _REGISTRY[name]
  except KeyError:
    raise KeyError(
        f"Unknown model {name!r}; registered models: {', '.join(list_models()) or '(none)'}."
    ) from None


def get_model(name: str, /, **kwargs: Any) -> nn.Module:
  """Instantiates the model registered under `name` with `kwargs` as its attributes.

  `name` is positional-only, so `kwargs` may hold the Flax submodule `name=` of the instance (e.g.
  `get_model("vit", name="image_tower", ...)` inside a task module).

  Raises:
    KeyError: for an unknown name (the message lists the known names).
    TypeError: for keyword arguments the model does not have (the message lists its fields).
  """
  cls = get_model_class(name)
  fields = [f.name for f in dataclasses.fields(cls)
            if f.init and f.name != "parent"]
  unknown = sorted(set(kwargs) - set(fields))
  if unknown:
    raise TypeError(
        f"Model {name!r} ({cls.__qualname__}) got unknown argument(s) {unknown}; "
        f"its arguments are {fields}.")
  return cls(**kwargs)
