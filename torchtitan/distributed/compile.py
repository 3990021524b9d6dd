"""Regional compilation: ``torch.compile`` each transformer block, not the whole model.

Blocks are identical in structure, so dynamo compiles one graph and reuses it for every
block (parameters are graph inputs, not constants), which keeps cold compile time flat in
the number of layers. Compiling per block also leaves the FSDP hooks on the block boundary
outside the graph, where FSDP2's eager all-gather / reduce-scatter overlap works unchanged.
``fullgraph=True`` makes a graph break an error instead of a silent slowdown.

Inputs that are still in flight are waited for before entering the graph: DTensor hands out
the result of a functional collective lazily as an ``AsyncCollectiveTensor`` (e.g. the
sequence-sharded output of the tensor-parallel embedding, a reduce-scatter). Fed straight
into a compiled block, AOTAutograd routes its gradient around the DTensor ``to_local``
backward (torch 2.13, CPU/gloo: a crash without FSDP, an all-zero embedding gradient with
it). A differentiable ``clone`` in eager waits and hands the graph a plain tensor; it costs
one copy of one activation, only where such an input occurs. See docs/composability.md.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed._functional_collectives import AsyncCollectiveTensor

__all__ = ["apply_compile"]


def _materialize_async_inputs(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    if not any(isinstance(a, AsyncCollectiveTensor) for a in args):
        return None
    return tuple(a.clone() if isinstance(a, AsyncCollectiveTensor) else a for a in args)


def apply_compile(model: nn.Module, backend: str = "inductor") -> nn.Module:
    """Replace each block of ``model.layers`` by its compiled wrapper, in place.

    Parameter names gain an ``_orig_mod.`` segment, which
    ``torch.distributed.checkpoint.state_dict`` strips again.
    """
    for name, block in list(model.layers.named_children()):
        compiled = torch.compile(block, backend=backend, fullgraph=True)
        # A hook on the wrapper runs in eager, before the compiled forward.
        compiled.register_forward_pre_hook(_materialize_async_inputs)
        model.layers.register_module(name, compiled)
    return model
