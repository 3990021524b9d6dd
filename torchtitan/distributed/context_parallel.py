"""Context parallelism (CP): split the sequence over the ``cp`` mesh, ring attention in SDPA.

Each CP rank keeps ``seq_len / cp`` tokens of every sample: the inputs, the labels and the
rows of the rotary table (``freqs_cis``) that go with them. Everything in a transformer but
attention is per token, so only attention must see other ranks' tokens: inside
:func:`cp_context`, ``F.scaled_dot_product_attention`` is replaced by torch's ring attention
(``torch.distributed.tensor.experimental.context_parallel``), which passes key/value shards
around the ring (``allgather`` or ``alltoall``) and merges the partial results by their
log-sum-exp. The model is not edited.

Causal load balancing ("head-tail"): with a causal mask the rank holding the last tokens does
most of the work. The sequence is cut into ``2 × cp`` chunks and rank ``r`` takes chunks
``r`` and ``2·cp − 1 − r``, so every rank gets one cheap and one expensive chunk.
:func:`head_tail_indices` is that permutation, :func:`shard_sequence` applies it.

CPU: torch ships ring attention for the CUDA kernels (flash, memory-efficient, cuDNN) only;
on CPU SDPA lowers to ``aten._scaled_dot_product_flash_attention_for_cpu``, which DTensor
cannot shard. :func:`register_cpu_flash_attention` adds that op (forward and backward) to
the same ring-attention dispatcher; it is active only inside a CP context.

All of this relies on private torch modules (the CP API is experimental): imports are
guarded and fail with one line naming the torch version.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import math
from types import ModuleType
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from torchtitan.config import ConfigError

__all__ = [
    "ROTATE_METHODS",
    "validate_cp",
    "head_tail_indices",
    "shard_sequence",
    "unshard_sequence",
    "register_cpu_flash_attention",
    "prepare_model_for_cp",
    "cp_context",
]

ROTATE_METHODS = ("allgather", "alltoall")


# ---- validation ----------------------------------------------------------------------
def validate_cp(
    cp: int,
    seq_len: int,
    load_balance: bool,
    rotate_method: str,
    tp: int = 1,
) -> None:
    """Fail early, with the option to change, on a CP setting this build cannot run."""
    if cp <= 1:
        return
    chunks = 2 * cp if load_balance else cp
    if seq_len % chunks != 0:
        why = f"2 × context_parallel_degree ({cp}) for load balancing" if load_balance else (
            f"context_parallel_degree ({cp})"
        )
        raise ConfigError(
            f"training.seq_len {seq_len} must be divisible by {chunks} = {why}; "
            f"use a multiple of {chunks}"
        )
    if tp > 1 and seq_len % (cp * tp) != 0:
        raise ConfigError(
            f"training.seq_len {seq_len} must be divisible by context_parallel_degree ({cp}) × "
            f"tensor_parallel_degree ({tp}): sequence parallelism splits each CP shard over the "
            f"tp ranks; use a multiple of {math.lcm(chunks, cp * tp)}"
        )
    if rotate_method not in ROTATE_METHODS:
        raise ConfigError(
            f"parallelism.context_parallel_rotate_method {rotate_method!r} is not one of {ROTATE_METHODS}"
        )
    _cp_attention()  # torch must have the CP dispatcher


# ---- the load-balancing permutation --------------------------------------------------
def head_tail_indices(seq_len: int, cp: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Positions in sharded order: rank ``r``'s shard is chunks ``r`` and ``2·cp−1−r``.

    ``seq[head_tail_indices(...)]`` laid out contiguously and cut into ``cp`` equal pieces
    gives each rank its two chunks. The inverse is ``torch.argsort`` of the result.
    """
    if seq_len % (2 * cp) != 0:
        raise ValueError(f"seq_len {seq_len} is not divisible by 2 × cp = {2 * cp}")
    chunks = torch.arange(seq_len, device=device).view(2 * cp, seq_len // (2 * cp))
    order = [c for r in range(cp) for c in (r, 2 * cp - 1 - r)]
    return chunks[order].flatten()


def shard_sequence(
    x: torch.Tensor, seq_dim: int, cp_rank: int, cp: int, load_balance: bool
) -> torch.Tensor:
    """This rank's part of ``x`` along ``seq_dim`` (what the CP context leaves on a rank)."""
    if load_balance:
        x = x.index_select(seq_dim, head_tail_indices(x.shape[seq_dim], cp, x.device))
    return x.chunk(cp, dim=seq_dim)[cp_rank]


def unshard_sequence(shards: Sequence[torch.Tensor], seq_dim: int, load_balance: bool) -> torch.Tensor:
    """Inverse of :func:`shard_sequence` given every rank's shard, in rank order."""
    x = torch.cat(list(shards), dim=seq_dim)
    if load_balance:
        inverse = torch.argsort(head_tail_indices(x.shape[seq_dim], len(shards), x.device))
        x = x.index_select(seq_dim, inverse)
    return x


# ---- torch's private CP modules ------------------------------------------------------
def _cp_attention() -> ModuleType:
    """The attention module of torch's experimental CP package (private, hence checked)."""
    errors = []
    for pkg in (
        "torch.distributed.tensor.experimental._context_parallel",  # current layout
        "torch.distributed.tensor.experimental",  # older layout
    ):
        try:
            attention = importlib.import_module(f"{pkg}._attention")
        except ImportError as e:
            errors.append(str(e))
            continue
        needed = ("_templated_ring_attention", "_templated_ring_attention_backward", "_cp_options",
                  "custom_ops", "set_rotate_method", "context_parallel")
        if all(hasattr(attention, name) for name in needed) and _ring_takes_group(attention):
            return attention
    raise ConfigError(
        f"parallelism.context_parallel_degree > 1 needs torch's context-parallel dispatcher, "
        f"which torch {torch.__version__} lacks or moved ({'; '.join(errors) or 'API changed'}); "
        "use torch 2.11 or newer, or set context_parallel_degree = 1"
    )


def _ring_takes_group(attention: ModuleType) -> bool:
    """The ring functions' calling convention used here: ``(group, seq_dim, op, ...)``."""
    for fn in (attention._templated_ring_attention, attention._templated_ring_attention_backward):
        if list(inspect.signature(fn).parameters)[:3] != ["group", "seq_dim", "op"]:
            return False
    return True


# ---- CPU flash attention through the ring --------------------------------------------
_aten = torch.ops.aten
_CPU_FWD = _aten._scaled_dot_product_flash_attention_for_cpu.default
_CPU_BWD = _aten._scaled_dot_product_flash_attention_for_cpu_backward.default
_SEQ_DIM = 2  # SDPA tensors are [batch, heads, seq, head_dim]; logsumexp [batch, heads, seq]


def _unwrap(args: Sequence[Any], kwargs: dict[str, Any]) -> tuple[DeviceMesh, list[Any], dict[str, Any]]:
    """Local tensors of sequence-sharded DTensor arguments, and their (1-D cp) mesh."""
    from torch.distributed.tensor import DTensor, Shard

    mesh = None

    def local(a: Any) -> Any:
        nonlocal mesh
        if not isinstance(a, DTensor):
            return a
        if tuple(a.placements) != (Shard(_SEQ_DIM),):
            raise NotImplementedError(
                f"CPU ring attention expects sequence-sharded inputs, got {a.placements}"
            )
        mesh = a.device_mesh
        return a.to_local()

    local_args = [local(a) for a in args]
    local_kwargs = {k: local(v) for k, v in kwargs.items()}
    if mesh is None:
        raise AssertionError("CPU ring attention was called without DTensor inputs")
    return mesh, local_args, local_kwargs


def _wrap(local: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    from torch.distributed.tensor import DTensor, Shard

    return DTensor.from_local(local, mesh, [Shard(_SEQ_DIM)], run_check=False)


def _cpu_flash_handler(op_call: torch._ops.OpOverload, args: tuple, kwargs: dict) -> object:
    """DTensor handler for the CPU flash-attention ops: run them around the ring."""
    attention = _cp_attention()
    mesh, largs, lkwargs = _unwrap(args, kwargs)
    if lkwargs.get("attn_mask") is not None:
        raise NotImplementedError("context parallel attention does not support attn_mask")
    group = mesh.get_group()
    if op_call is _CPU_FWD:
        names = ("query", "key", "value", "dropout_p", "is_causal")
        bound = {**dict(zip(names, largs)), **lkwargs}
        bound.pop("attn_mask", None)
        q, k, v = bound.pop("query"), bound.pop("key"), bound.pop("value")
        out, lse = attention._templated_ring_attention(group, _SEQ_DIM, _CPU_FWD, q, k, v, **bound)[:2]
        return _wrap(out, mesh), _wrap(lse, mesh)
    names = ("grad_out", "query", "key", "value", "out", "logsumexp", "dropout_p", "is_causal")
    bound = {**dict(zip(names, largs)), **lkwargs}
    bound.pop("attn_mask", None)
    grad_out = bound.pop("grad_out")
    grads = attention._templated_ring_attention_backward(
        group, _SEQ_DIM, _CPU_BWD, grad_out=grad_out, grad_out_name="grad_out", **bound
    )
    return tuple(_wrap(g, mesh) for g in grads[:3])


def register_cpu_flash_attention() -> None:
    """Let CP's dispatcher run CPU SDPA (``_scaled_dot_product_flash_attention_for_cpu``
    and its backward) as ring attention. Idempotent; the handlers are installed into the
    same table as torch's CUDA ones, so they are active only inside a CP context."""
    attention = _cp_attention()
    attention.custom_ops[_CPU_FWD] = _cpu_flash_handler
    attention.custom_ops[_CPU_BWD] = _cpu_flash_handler


# ---- model and context ---------------------------------------------------------------
def prepare_model_for_cp(model: nn.Module) -> nn.Module:
    """Let every submodule that has a CP hook (a ``prepare_for_cp()`` method) adjust itself.

    The attention modules own what ring attention needs of them (the SDPA module of
    models/common repeats grouped keys/values, as ring attention passes equal-head q/k/v to
    the kernels); this floor only knows the hook's name, not the modules."""
    for module in model.modules():
        hook = getattr(module, "prepare_for_cp", None)
        if callable(hook):
            hook()
    return model


@contextlib.contextmanager
def _freqs_for_seq(model: nn.Module, seq_len: int) -> Iterator[torch.Tensor | None]:
    """Temporarily give ``model`` a private copy of the first ``seq_len`` rotary rows (the
    CP context shards it in place), restoring the full table afterwards."""
    table = getattr(model, "freqs_cis", None)
    if table is None:
        yield None
        return
    if table.shape[0] < seq_len:
        raise ConfigError(
            f"rotary table has {table.shape[0]} rows < training.seq_len {seq_len}; build the "
            "model with max_seq_len >= seq_len"
        )
    model.freqs_cis = table[:seq_len].clone()
    try:
        yield model.freqs_cis
    finally:
        model.freqs_cis = table


@contextlib.contextmanager
def cp_context(
    cp_mesh: DeviceMesh,
    model: nn.Module | Sequence[nn.Module],
    inputs: torch.Tensor,
    labels: torch.Tensor,
    rotate_method: str = "allgather",
    load_balance: bool = True,
) -> Iterator[None]:
    """Shard ``inputs`` and ``labels`` ``[batch, seq]`` (in place) and ``model.freqs_cis``
    along the sequence over ``cp_mesh``, and run SDPA as ring attention, for one
    forward + backward. Every rank of ``cp_mesh`` must pass the same full batch.

    ``model`` may be this rank's pipeline stages: each has its own rotary table, and the
    whole pipelined step (every microbatch's forward and backward) runs inside the context;
    the activations passed between stages are then sequence shards already.

    ``inputs``/``labels`` stay sharded after the context (they are not needed again);
    the rotary tables are restored.
    """
    attention = _cp_attention()
    if rotate_method not in ROTATE_METHODS:
        raise ConfigError(
            f"parallelism.context_parallel_rotate_method {rotate_method!r} is not one of {ROTATE_METHODS}"
        )
    if inputs.device.type == "cpu":
        register_cpu_flash_attention()
    seq_len = inputs.shape[1]
    attention.set_rotate_method(rotate_method)
    options = attention._cp_options
    old_balance = options.enable_load_balance
    options.enable_load_balance = load_balance  # read by torch's default (head-tail) balancer
    try:
        with contextlib.ExitStack() as tables:
            models = [model] if isinstance(model, nn.Module) else list(model)
            freqs = [f for m in models if (f := tables.enter_context(_freqs_for_seq(m, seq_len))) is not None]
            buffers = [inputs, labels, *freqs]
            seq_dims = [1, 1] + [0] * len(freqs)
            with attention.context_parallel(
                cp_mesh, buffers=buffers, buffer_seq_dims=seq_dims, no_restore_buffers=set(buffers)
            ):
                # context_parallel resets the option to "a balancer exists", which is ours.
                yield
    finally:
        options.enable_load_balance = old_balance
