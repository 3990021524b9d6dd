"""Expert parallelism: each rank of an ``ep`` group holds ``num_experts / ep`` routed experts.

Applied from outside the model, like TP: ``apply_ep`` turns the stacked expert weights of
every ``MoE`` layer into DTensors sharded on the expert dim (``Shard(0)`` over the ``ep``
mesh) and puts an :class:`ExpertDispatcher` around ``MoE.experts`` as a forward pre-hook
(dispatch) and a forward hook (combine). ``MoE.forward`` is unchanged: it still sorts its
token copies by global expert id and calls ``experts(rows, counts)``; under EP the hooks

1. **dispatch**: exchange the per-expert counts with one small all-to-all (``[E]`` int64 per
   rank), read the split sizes on the host, send every row to the rank that owns its expert
   (``all_to_all_single_autograd``: its backward is the reverse all-to-all), and regroup the
   received rows by local expert (they arrive grouped by source rank);
2. let ``GroupedExperts.forward`` run on the local weight shard (``to_local()``) with the
   local counts;
3. **combine**: undo the regrouping and send each row back to the rank it came from, in
   the order ``MoE.forward`` expects, which then weights and adds them to their tokens.

Why DTensors rather than plain local tensors: the global shape stays known, so DCP
checkpoints reshard across EP degrees, FSDP composes with EP through its own (dp, ep) mesh
handling, and ``clip_grad_norm_`` counts every expert once (the norm's partial sums are
reduced over the mesh dims the expert dim is split across, and nowhere else).

Gradients: a rank's expert gradient already sums the contributions of every token its
experts processed, from all ranks of its EP group; FSDP then reduces it over the remaining
data ranks (``dp_shard_mod_ep``, and ``dp_replicate`` under HSDP). To equal the mean over
all data ranks that the other parameters get, the experts' FSDP units divide by
dp_replicate x dp_shard x cp instead of by their own group size (``apply_fsdp``'s
``ep_gradient_divide_factor``).

Tensor parallelism (``apply_moe_tp``): the MoE input is gathered along the sequence and the
layer runs on the whole (replicated) sequence on every TP rank: the router and the routed
experts are replicated over tp (each TP rank routes the same tokens, computes the same
expert outputs and gets the same, complete gradients: nothing to reduce over tp), the
shared experts keep the column/row-wise plan of a dense MLP, and the output is cut back to
the rank's sequence shard. TP ranks therefore duplicate the routed-expert work; EP over
dp_shard x cp is what divides it. Token counts for the load balancing are summed over
dp x cp only (``torchtitan.models.common.moe``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInputOutput,
    RowwiseParallel,
    parallelize_module,
)

__all__ = ["ExpertDispatcher", "apply_ep", "apply_moe_tp", "expert_modules", "ignore_profiler_ops_in_op_sac"]


class ExpertDispatcher:
    """All-to-all token dispatch and combine around one ``GroupedExperts`` module.

    Holds the split sizes and the regrouping permutation of the forward in flight between
    the pre-hook and the hook (the two always run in pairs, also when activation
    checkpointing recomputes the layer in backward).
    """

    def __init__(self, ep_mesh: DeviceMesh, num_experts: int) -> None:
        self.ep_mesh = ep_mesh
        self.group = ep_mesh.get_group()
        self.ep = ep_mesh.size()
        if num_experts % self.ep != 0:
            raise ValueError(f"expert parallel degree {self.ep} must divide num_experts {num_experts}")
        self.num_experts = num_experts
        self.num_local = num_experts // self.ep
        self._state: tuple[list[int], list[int], torch.Tensor] | None = None

    def dispatch(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        x, counts = args
        ep, nl = self.ep, self.num_local
        counts = counts.to(torch.int64)
        # 1. Counts: recv[s * nl + j] = rows rank s sends for my local expert j.
        recv = torch.empty_like(counts)
        dist.all_to_all_single(recv, counts, group=self.group)
        # 2. Split sizes on the host: all_to_all_single takes Python ints. This is the one
        #    host sync of the layer (the row count is data-dependent, so the output buffer's
        #    size must be known before the rows can move); one copy for both lists.
        splits = torch.stack([counts.view(ep, nl).sum(1), recv.view(ep, nl).sum(1)]).tolist()
        input_splits, output_splits = splits[0], splits[1]
        rows = all_to_all_single_autograd(x, output_splits, input_splits, self.group)
        # 3. Rows arrive grouped by (source rank, local expert): regroup by local expert.
        local_ids = torch.arange(nl, device=counts.device).repeat(ep)
        expert_of_row = torch.repeat_interleave(local_ids, recv, output_size=sum(output_splits))
        perm = torch.argsort(expert_of_row, stable=True)
        self._state = (input_splits, output_splits, perm)
        return rows[perm], recv.view(ep, nl).sum(0)

    def combine(self, module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
        assert self._state is not None, "combine without dispatch"
        input_splits, output_splits, perm = self._state
        self._state = None
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(perm.numel(), device=perm.device)
        # Back to (source rank, local expert) order, then to the ranks the rows came from.
        return all_to_all_single_autograd(out[inverse], input_splits, output_splits, self.group)


def _is_moe(module: nn.Module) -> bool:
    """The MoE contract this floor relies on (``torchtitan.models.common.moe.MoE`` meets it;
    this module does not import it, models sit above distributed/): a ``router`` with a
    ``gate`` linear, ``experts`` whose ``forward(rows, counts)`` takes token copies sorted by
    expert and whose parameters are stacked on a leading expert dim of ``num_experts``, and
    ``shared_experts`` (a SwiGLU with ``w1``/``w2``/``w3`` linears, or None)."""
    experts = getattr(module, "experts", None)
    return hasattr(module, "router") and experts is not None and hasattr(experts, "num_experts")


def expert_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The MoE layers of ``model`` with their qualified names."""
    return [(name, m) for name, m in model.named_modules() if _is_moe(m)]


def apply_ep(model: nn.Module, ep_mesh: DeviceMesh) -> nn.Module:
    """Shard every MoE layer's routed experts over the 1-D ``ep_mesh`` (in place; works on
    a meta model) and route tokens to them by all-to-all. Returns ``model``."""
    ep = ep_mesh.size()
    for _, moe in expert_modules(model):
        experts = moe.experts
        if experts.num_experts % ep != 0:
            raise ValueError(
                f"parallelism.expert_parallel_degree {ep} must divide num_experts {experts.num_experts}"
            )
        for name, param in list(experts.named_parameters(recurse=False)):
            # src_data_rank=None: every rank takes its own chunk, no communication (and it
            # works on meta tensors); materialisation fills the values.
            shard = distribute_tensor(param.data, ep_mesh, [Shard(0)], src_data_rank=None)
            experts.register_parameter(name, nn.Parameter(shard, requires_grad=param.requires_grad))
        dispatcher = ExpertDispatcher(ep_mesh, experts.num_experts)
        experts.register_forward_pre_hook(dispatcher.dispatch)
        experts.register_forward_hook(dispatcher.combine)
        experts.ep_dispatcher = dispatcher  # type: ignore[assignment]
    return model


class _ReplicateParallel(ParallelStyle):
    """Parameters become ``Replicate`` DTensors over tp; the module takes and returns plain
    (local) tensors. For modules that every TP rank runs whole on the same input (the
    router): their gradients come out complete and identical on every rank, and the
    optimizer sees DTensors like everywhere else under TP."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def replicate(name: str, mod: nn.Module, mesh: DeviceMesh) -> None:
            for pname, param in list(mod.named_parameters(recurse=False)):
                dt = distribute_tensor(param.data, mesh, [Replicate()], src_data_rank=None)
                mod.register_parameter(pname, nn.Parameter(dt, requires_grad=param.requires_grad))

        def to_dtensor(mod: nn.Module, inputs: tuple[Any, ...], mesh: DeviceMesh) -> tuple[Any, ...]:
            return tuple(
                DTensor.from_local(x, mesh, [Replicate()], run_check=False)
                if isinstance(x, torch.Tensor) and not isinstance(x, DTensor)
                else x
                for x in inputs
            )

        def to_local(mod: nn.Module, outputs: Any, mesh: DeviceMesh) -> Any:
            return outputs.to_local() if isinstance(outputs, DTensor) else outputs

        return distribute_module(module, device_mesh, replicate, to_dtensor, to_local)


def _replicate_params(module: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Plain parameters of ``module`` -> ``Replicate`` DTensors over tp (the module reads
    them with ``to_local()`` itself, as ``GroupedExperts`` does)."""
    for name, param in list(module.named_parameters(recurse=False)):
        if not isinstance(param, DTensor):
            dt = distribute_tensor(param.data, tp_mesh, [Replicate()], src_data_rank=None)
            module.register_parameter(name, nn.Parameter(dt, requires_grad=param.requires_grad))


def apply_moe_tp(moe: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Tensor parallelism for one MoE layer fed by sequence-parallel activations.

    Input ``Shard(1)`` (sequence) -> ``Replicate`` (gathered) as a local tensor; the router
    and the routed experts run replicated; shared experts column/row-wise with their output
    all-reduced; the layer's (replicated) output is cut back to the sequence shard.
    """
    parallelize_module(
        moe,
        tp_mesh,
        PrepareModuleInputOutput(
            input_layouts=(Shard(1),),
            desired_input_layouts=(Replicate(),),
            use_local_input=True,
            output_layouts=(Replicate(),),
            desired_output_layouts=(Shard(1),),
            use_local_output=True,
        ),
    )
    parallelize_module(moe.router.gate, tp_mesh, _ReplicateParallel())
    # Routed experts: replicated over tp (already DTensors over ep when EP ran first).
    _replicate_params(moe.experts, tp_mesh)
    if moe.shared_experts is not None:
        parallelize_module(
            moe.shared_experts,
            tp_mesh,
            {
                "w1": ColwiseParallel(),
                "w3": ColwiseParallel(),
                "w2": RowwiseParallel(output_layouts=Replicate()),
            },
        )


def ignore_profiler_ops_in_op_sac() -> None:
    """Let selective-op activation checkpointing ignore the profiler's record_function ops.

    Under EP the routed experts are an FSDP unit nested in the checkpointed block, and FSDP's
    hooks open more ``record_function`` ranges when the block is recomputed in backward than
    in forward; op SAC replays ops by their position and stops at the first extra one
    ("... invocation index N encountered during backward but not found in storage"). The
    ranges are profiler markers with no effect on any value, so they join the ops torch's
    SAC already leaves out of its bookkeeping (``torch.utils.checkpoint.SAC_IGNORED_OPS``;
    torch 2.13). Idempotent.
    """
    import torch.utils.checkpoint as ckpt

    names = ("_record_function_enter", "_record_function_enter_new", "_record_function_exit")
    packets = [getattr(torch.ops.profiler, n) for n in names if hasattr(torch.ops.profiler, n)]
    ops = {getattr(p, overload) for p in packets for overload in p.overloads()}
    ckpt.SAC_IGNORED_OPS.update(ops)
