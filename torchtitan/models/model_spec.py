"""What the trainer needs to know about a model family, and how to reference code lazily."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Protocol

from torch import nn

if TYPE_CHECKING:
    from torchtitan.config import JobConfig

__all__ = ["BaseModelArgs", "ModelShape", "ModelSpec", "check_state_shapes", "lazy_function", "vocab_size_for"]


@dataclass(frozen=True)
class ModelShape:
    """A decoder-only transformer's shape as the dry-run planner models it (global sizes).

    Dense families leave the MoE fields at 0. An MoE layer holds ``num_experts`` routed
    experts of hidden size ``moe_hidden`` of which each token uses ``top_k``, plus shared
    experts of total hidden size ``shared_hidden``; ``n_moe_layers`` of the ``n_layers``
    blocks are MoE, the others have a dense feed-forward of hidden size ``hidden``.
    """

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden: int  # dense feed-forward hidden size
    vocab: int
    tied_embeddings: bool = False
    qk_norm: bool = False
    n_moe_layers: int = 0
    num_experts: int = 0
    top_k: int = 0
    moe_hidden: int = 0
    shared_hidden: int = 0
    # Multi-head latent attention (DeepSeek); kv_lora_rank 0 = ordinary attention. head_dim is
    # then a query/key head's width (non-rotary + rotary parts), n_kv_heads = n_heads.
    kv_lora_rank: int = 0
    q_lora_rank: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0


class BaseModelArgs(Protocol):
    """What the trainer and the planner call on a flavor's args."""

    def update_from_config(self, job_config: JobConfig, tokenizer: Any | None = None) -> None:
        """Fit the args to a run (vocabulary, sequence length, attention backend); raise
        ``ConfigError`` naming the option for a setting this family cannot run."""
        ...

    def get_nparams_and_flops(self, model: nn.Module, seq_len: int) -> tuple[int, int]:
        """Parameter count and training FLOPs per token (active parameters for MoE)."""
        ...

    def model_shape(self) -> ModelShape:
        """The shape the planner's memory and cost models read."""
        ...


@dataclass
class ModelSpec:
    """A model family: everything the trainer, the planner and the scripts need of it.

    The trainer knows no family; it calls only these (docs/models.md, "adding a model family"):

    - ``model_cls(args)`` builds the model (on meta); it has ``init_weights(buffer_device=)``.
    - ``flavors``: named args (``BaseModelArgs``).
    - ``parallelize_fn(model, parallel_dims, job_config)`` applies TP/EP/AC/compile/FSDP.
    - ``pipelining_fn(model, parallel_dims, job_config, device, args, parallelize_fn,
      loss_fn)`` cuts it into pipeline stages -> (schedule, parts, has_first, has_last).
    - ``build_loss_fn``: the loss (``None``: the default cross-entropy).
    - ``state_dict_adapter``: a class built from the args with ``to_hf(state)``,
      ``from_hf(hf_state)``, ``hf_config()`` and a static ``args_from_hf_config(config)``;
      optionally ``ignores_hf_key(key)``: stored tensors the model leaves out by design.
    - ``validate_fn(job_config, model_args)``: checks that need the family's args (e.g. the
      expert count against the expert-parallel degree); raises ``ConfigError``. Run before
      anything is built, by the trainer and the planner alike.
    - ``build_step_hooks_fn(model_parts, parallel_dims)`` -> callables run after every
      optimizer step (e.g. MoE load balancing: the expert-bias update).
    - ``metrics_fn(model_parts)`` -> extra scalars logged with each step line
      (e.g. MoE router load).
    """

    name: str
    model_cls: type[nn.Module]
    flavors: dict[str, BaseModelArgs]
    parallelize_fn: Callable[..., Any]
    pipelining_fn: Callable[..., Any]
    build_loss_fn: Callable[..., Any] | None = None
    state_dict_adapter: Any | None = None
    validate_fn: Callable[..., None] | None = None
    build_step_hooks_fn: Callable[..., list[Callable[[], None]]] | None = None
    metrics_fn: Callable[..., dict[str, float]] | None = None


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


def vocab_size_for(flavor_vocab_size: int, tokenizer: Any | None) -> int:
    """A flavor's vocabulary for a run: ``-1`` (the debug flavors) takes the tokenizer's; a
    fixed one (a released checkpoint's) is kept, so checkpoints stay loadable, after checking
    that the tokenizer's ids fit. Raises ValueError naming the option to change."""
    if flavor_vocab_size == -1:
        if tokenizer is None:
            raise ValueError("this model flavor takes vocab_size from the tokenizer: set model.tokenizer_path")
        return int(tokenizer.vocab_size)
    if tokenizer is not None and tokenizer.vocab_size > flavor_vocab_size:
        raise ValueError(
            f"tokenizer vocab_size {tokenizer.vocab_size} exceeds the model's vocab_size "
            f"{flavor_vocab_size}: pick a model.flavor whose vocabulary fits or a matching "
            "model.tokenizer_path"
        )
    return flavor_vocab_size


def check_state_shapes(model_cls: type[nn.Module], args: Any, state: Any) -> None:
    """Raise a one-line ValueError unless ``state`` has exactly the names and shapes of
    ``model_cls(args)`` (built on the meta device: no memory); the adapters' ``check``."""
    import torch

    with torch.device("meta"):
        model = model_cls(args)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for key, shape in expected.items():
        if key not in state:
            raise ValueError(f"the weights lack {key} (expected shape {shape})")
        if tuple(state[key].shape) != shape:
            raise ValueError(
                f"{key} has shape {tuple(state[key].shape)} but this model needs {shape}: "
                "is it the right flavor / config?"
            )
    extra = sorted(set(state) - set(expected))
    if extra:
        raise ValueError(f"the weights have {extra[0]}, which this model lacks")
