"""Model registry: model families by name (``model.name``), each with its flavors.

Importing this package registers the built-in families. A new family adds
``torchtitan/models/<name>/`` with a ``ModelSpec`` and one ``register_model_spec`` line below.
"""

from __future__ import annotations

import copy

from torchtitan.models.model_spec import BaseModelArgs, ModelSpec, lazy_function

__all__ = [
    "BaseModelArgs",
    "ModelSpec",
    "check_model_config",
    "get_model_args",
    "get_model_spec",
    "lazy_function",
    "list_model_specs",
    "register_model_spec",
]

_MODEL_SPECS: dict[str, ModelSpec] = {}


def register_model_spec(spec: ModelSpec) -> None:
    """Make ``spec`` available as ``model.name = spec.name``; names are unique."""
    if spec.name in _MODEL_SPECS:
        raise ValueError(f"model {spec.name!r} is already registered")
    _MODEL_SPECS[spec.name] = spec


def list_model_specs() -> list[str]:
    return sorted(_MODEL_SPECS)


def get_model_spec(name: str) -> ModelSpec:
    if name not in _MODEL_SPECS:
        raise ValueError(
            f"unknown model.name {name!r}: choose one of {', '.join(list_model_specs())}"
        )
    return _MODEL_SPECS[name]


def get_model_args(name: str, flavor: str) -> BaseModelArgs:
    """A copy of the args of ``model.name``/``model.flavor``, free to be updated for a run."""
    spec = get_model_spec(name)
    if flavor not in spec.flavors:
        raise ValueError(
            f"unknown model.flavor {flavor!r} for model {name!r}: "
            f"choose one of {', '.join(spec.flavors)}"
        )
    return copy.deepcopy(spec.flavors[flavor])


def check_model_config(job_config) -> None:
    """The family's own checks of a run's config (``ModelSpec.validate_fn``), made before
    anything is built by the trainer and the planner alike; raises ``ConfigError``."""
    spec = get_model_spec(job_config.model.name)
    if spec.validate_fn is not None:
        spec.validate_fn(job_config, get_model_args(job_config.model.name, job_config.model.flavor))


def _register_builtin_models() -> None:
    from torchtitan.models.deepseek_v3 import deepseek_v3_spec
    from torchtitan.models.llama3 import llama3_spec
    from torchtitan.models.qwen3 import qwen3_spec

    register_model_spec(llama3_spec)
    register_model_spec(qwen3_spec)
    register_model_spec(deepseek_v3_spec)


_register_builtin_models()
