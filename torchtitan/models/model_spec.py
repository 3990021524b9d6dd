"""What the trainer needs to know about a model family, and how to reference code lazily."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Protocol

from torch import nn

if TYPE_CHECKING:
    from torchtitan.config import JobConfig

__all__ = ["BaseModelArgs", "ModelSpec", "lazy_function"]


class BaseModelArgs(Protocol):
    """What the trainer calls on a flavor's args (``TransformerModelArgs`` satisfies it)."""

    def update_from_config(self, job_config: JobConfig, tokenizer: Any | None = None) -> None: ...

    def get_nparams_and_flops(self, model: nn.Module, seq_len: int) -> tuple[int, int]: ...


@dataclass
class ModelSpec:
    """A model family: its module class, named flavors and how to parallelize it.

    ``model_cls(args)`` builds the model (on meta, by the trainer). ``parallelize_fn`` applies
    TP/AC/compile/FSDP to it; ``pipelining_fn`` splits it into pipeline stages;
    ``build_loss_fn`` builds the loss (``None``: the trainer's default cross-entropy).
    """

    name: str
    model_cls: type[nn.Module]
    flavors: dict[str, BaseModelArgs]
    parallelize_fn: Callable[..., Any]
    pipelining_fn: Callable[..., Any]
    build_loss_fn: Callable[..., Any] | None = None


def lazy_function(target: str) -> Callable[..., Any]:
    """A callable standing for ``"package.module:function"``, imported on first call.

    Lets a registry entry name code that imports heavy dependencies, or that is not written
    yet, without importing it when the registry is.
    """
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"lazy function target {target!r} must look like 'package.module:function'")

    def call(*args: Any, **kwargs: Any) -> Any:
        fn = getattr(importlib.import_module(module_name), attr)
        return fn(*args, **kwargs)

    call.__name__ = attr
    call.__qualname__ = attr
    call.__module__ = module_name
    call.__doc__ = f"Imports and calls {target}."
    return call
